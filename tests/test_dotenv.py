"""`.env` files read as operators expect (python-dotenv): inline comments, quotes, `export`, and the
environment winning over the file, which wins over `.run/env`."""

from __future__ import annotations

from shared.config import load_settings


def test_dotenv_comments_quotes_and_precedence(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "UPSTREAM_API_KEY=sk-abc  # my key\n"
        'NAME="My # node"\n'
        "DESCRIPTION='single quoted # kept'\n"
        "export LOG_LEVEL=debug\n"
        "# a comment line\n"
        "PORT=9000\n"
    )
    run_env = tmp_path / "run.env"
    run_env.write_text("NATS_URL=nats://127.0.0.1:4999\nPORT=1\n")
    settings = load_settings({"PORT": "8100"}, dotenv, run_env)
    assert settings.upstream_api_key == "sk-abc"
    assert settings.name == "My # node"
    assert settings.description == "single quoted # kept"
    assert settings.log_level == "DEBUG"
    assert settings.port == 8100  # the environment wins over both files
    assert settings.nats_url == "nats://127.0.0.1:4999"  # .run/env fills what nothing else set
    assert load_settings({}, dotenv, run_env).port == 9000  # .env wins over .run/env
