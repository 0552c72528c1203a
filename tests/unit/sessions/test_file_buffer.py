"""sessions/file_buffer.py: the buffer's obfuscation is the seed's (XOR with b"llmws", base64)."""
from llmws_server.sessions.file_buffer import simple_decrypt, simple_encrypt


def test_simple_encryption_is_the_seeds():
    assert simple_encrypt("hello") == "BAkBGxw="  # bytes 04 09 01 1b 1c: b"hello" XOR b"llmws"
    assert simple_decrypt(simple_encrypt('{"data": "é ✓ 🐉"}')) == '{"data": "é ✓ 🐉"}'
