import pytest

from baton.config import load_settings


def test_settings_precedence(tmp_path):
    path = tmp_path / "baton.toml"
    path.write_text('http_port = 9000\npolicy = "round-robin"\n')
    s = load_settings({"policy": "least-loaded"}, env={"BATON_CONFIG": str(path), "BATON_HTTP_PORT": "9100",
                                                        "BATON_ENFORCE_EAGER": "false"})
    assert s.http_port == 9100 and s.policy == "least-loaded" and s.enforce_eager is False


def test_settings_reject_typos_and_bad_values(tmp_path):
    path = tmp_path / "baton.toml"
    path.write_text("htp_port = 1\n")
    with pytest.raises(ValueError, match="htp_port"):
        load_settings(env={"BATON_CONFIG": str(path)})
    with pytest.raises(ValueError, match="http_port"):
        load_settings(env={"BATON_HTTP_PORT": "eighty"})
    with pytest.raises(ValueError, match="4 MiB"):
        load_settings({"kv_chunk_bytes": 8 << 20}, env={})
    with pytest.raises(ValueError, match="transfer_ttl_s"):
        load_settings({"transfer_ttl_s": 10}, env={})
    with pytest.raises(ValueError, match="dtype"):
        load_settings(env={"BATON_DTYPE": "bf16"})
