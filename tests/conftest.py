import functools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))  # trained_models, shared with the reports
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402

from tiny_models import ENCODER_KINDS, LANGUAGE_KINDS, TIMM_KINDS, save_encoder, save_language_model, save_timm, save_vit  # noqa: E402

MODEL_KINDS = [(k, False) for k in LANGUAGE_KINDS] + [("llama", True), ("qwen3", True), ("gpt2", True)]
# make test runs the suite under the current transformers (.venv) and again under 4.57 (.venv-compat)
COMPAT = int(transformers.__version__.split(".")[0]) < 5
TIMM_MODEL_KINDS = ("vit", *TIMM_KINDS)

# ---- tests that run in .venv only -------------------------------------------------------------------
# .venv-compat differs from .venv only in transformers, huggingface_hub and tokenizers. A test marked
# no_transformers runs none of their code (a timm model, a spec file, the writer, a refusal before any
# model is read), so it would only repeat itself there: .venv-compat skips it. In .venv the mark is
# checked: a marked test that builds or loads a transformers model or tokenizer, asks the hub for a file,
# or takes a transformers model from model_dir fails, and the mark must go.
NO_TRANSFORMERS = "no_transformers"
_marked: list = []  # the node id of the marked test running now, if any
_reached: list = []  # what such a test reached that it must not


def timm_case(*values):
    """A parametrize case on a timm model (which runs no transformers code): marked no_transformers."""
    return pytest.param(*values, marks=pytest.mark.no_transformers)


def pytest_configure(config):
    config.addinivalue_line("markers", f"{NO_TRANSFORMERS}: runs no transformers, huggingface_hub or tokenizers code; "
                                       "skipped under transformers 4.57 (.venv-compat), checked in .venv")
    if not COMPAT:
        _install_tripwires()


def pytest_collection_modifyitems(config, items):
    if COMPAT:
        skip = pytest.mark.skip(reason="runs no transformers code: nothing to check again under 4.57")
        for item in items:
            if item.get_closest_marker(NO_TRANSFORMERS):
                item.add_marker(skip)


def _reach(what: str) -> None:
    if _marked:
        _reached.append(what)


def _tripwire(owner, name: str, what: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        _reach(what)
        return original(*args, **kwargs)

    setattr(owner, name, guarded)


def _install_tripwires() -> None:
    import huggingface_hub
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    _tripwire(transformers.PreTrainedModel, "__init__", "builds a transformers model")
    _tripwire(PreTrainedTokenizerBase, "__init__", "builds a transformers tokenizer")
    for name in ("hf_hub_download", "snapshot_download"):
        _tripwire(huggingface_hub, name, f"calls huggingface_hub.{name}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):  # before the test's fixtures, so that what they build counts too
    _reached.clear()
    _marked[:] = [item.nodeid] if item.get_closest_marker(NO_TRANSFORMERS) else []
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    try:
        result = yield
    finally:
        _marked.clear()
    if _reached:
        raise AssertionError(f"{item.nodeid} is marked {NO_TRANSFORMERS} but {_reached[0]}: remove the mark "
                             "(it must run under transformers 4.57 too)")
    return result


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(kind, tied=False) -> folder of a tiny random model, built once per session."""
    cache: dict = {}

    def get(kind: str, tied: bool = False) -> Path:
        if kind not in TIMM_MODEL_KINDS:
            _reach(f"reads model_dir({kind!r}), a model transformers saved")
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
    return f"transformers {transformers.__version__}"
