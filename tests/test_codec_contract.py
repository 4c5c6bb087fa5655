"""Every built-in codec runs the same contract as a third-party plugin would."""

from deltahub.testing import CodecContract


class TestDense(CodecContract):
    codec_name = "dense"
    configs = [{}, {"dtype": "float16"}]
    max_rel_error = 1e-3  # fp16 cast; exact mode is checked bit for bit in test_compress.py


class TestCompeft(CodecContract):
    codec_name = "compeft"
    configs = [{}, {"density": 0.5, "scale": 1.5}, {"mode": "global", "density": 0.05}, {"density": 1.0}]


class TestAuto(CodecContract):
    codec_name = "auto"
    configs = [{"max_error": 0.5}, {"max_error": 0.01}, {"max_bits_per_param": 1.0}]


class TestDare(CodecContract):
    codec_name = "dare"
    configs = [{}, {"p": 0.0, "value_dtype": "float32"}, {"p": 0.3, "seed": 7, "value_dtype": "bfloat16"}]


class TestDarex(CodecContract):
    codec_name = "darex"
    configs = [{"q": 0.05}, {"p": 0.5, "q": 1.0, "seed": 3}, {"p": 0.9, "q": 0.1, "value_dtype": "float32"}]


class TestBitdelta(CodecContract):
    codec_name = "bitdelta"
    configs = [{}, {"include_embeddings": True}]


class TestBinary(CodecContract):
    codec_name = "binary"
    configs = [{}, {"bits": 2}, {"bits": 3, "levels": "lloyd_max"}, {"bits": 4}]
