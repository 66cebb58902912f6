import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))  # trained_models, shared with the reports
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_models import ENCODER_KINDS, LANGUAGE_KINDS, TIMM_KINDS, save_encoder, save_language_model, save_timm, save_vit  # noqa: E402

MODEL_KINDS = [(k, False) for k in LANGUAGE_KINDS] + [("llama", True), ("qwen3", True), ("gpt2", True)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(kind, tied=False) -> folder of a tiny random model, built once per session."""
    cache: dict = {}

    def get(kind: str, tied: bool = False) -> Path:
        key = (kind, tied)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{kind}{'_tied' if tied else ''}")
            if kind == "vit":
                cache[key] = save_vit(path)
            elif kind in ENCODER_KINDS:
                cache[key] = save_encoder(kind, path)
            elif kind in TIMM_KINDS:
                arch, overrides = TIMM_KINDS[kind]
                cache[key] = save_timm(arch, path, **overrides)
            else:
                cache[key] = save_language_model(kind, path, tied=tied)
        return cache[key]

    return get


def pytest_report_header(config):
    import transformers

    # make test runs the suite under the current transformers and under 4.57 (.venv-compat)
    return f"transformers {transformers.__version__}"
