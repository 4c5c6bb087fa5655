"""Every built-in codec runs the same contract as a third-party plugin would."""

from deltahub.testing import CodecContract


class TestDense(CodecContract):
    codec_name = "dense"
    configs = [{}, {"dtype": "float16"}]
    max_rel_error = 1e-3  # fp16 cast; exact mode is checked bit for bit in test_compress.py


class TestCompeft(CodecContract):
    codec_name = "compeft"
    configs = [{}, {"density": 0.5, "scale": 1.5}, {"mode": "global", "density": 0.05}, {"density": 1.0}]
