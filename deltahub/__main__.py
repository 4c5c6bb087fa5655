from deltahub.cli import main

main()
