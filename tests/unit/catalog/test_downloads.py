"""catalog/downloads.py without git or a server: what a download request is checked into."""
from llmws_server.catalog import downloads


def test_a_link_to_one_gguf_file_names_the_repo_and_the_file(tmp_path):
    class Config:
        download = {"allowed_url_prefixes": ["https://huggingface.co/"], "timeout_s": 60}
        paths = {"models_dir": tmp_path}
        root = tmp_path
    checked = downloads.Downloads(Config).check(
        "https://huggingface.co/org/name-GGUF/resolve/main/sub/name.Q4_K_M.gguf", "name")
    assert checked == ("https://huggingface.co/org/name-GGUF", tmp_path / "name", "sub/name.Q4_K_M.gguf")
