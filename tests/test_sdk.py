"""The model author's side: the SDK is standard-library only, the seed's import path works,
and the seed's example main.py runs unmodified."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SHIPPED_MODELS

from ws_server import AnythingBaseModel

SEED = ROOT.parent / "shared" / "seed" / "model_deploy.md"


def test_sdk_imports_with_the_standard_library_only() -> None:
    # -I -S: no site-packages at all, as in an isolated model's virtualenv.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from ws_server import AnythingBaseModel;"
        "from ws_server import seed_compat; seed_compat.install();"
        "from app.models.base import AnythingBaseModel as Seed;"
        "assert Seed is AnythingBaseModel;"
        "bad = {'pydantic', 'websockets', 'yaml', 'uvloop'} & set(sys.modules);"
        "assert not bad, bad; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_seed_alias_does_not_shadow_a_real_app_package(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("REAL = True\n")
    code = (
        "import sys; sys.path[:0] = sys.argv[1:3];"
        "from ws_server import seed_compat; seed_compat.install();"
        "import app; assert app.REAL; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == "ok", result.stderr


# sha256 of the example main.py in seed/model_deploy.md, for checkouts without ../shared.
SEED_EXAMPLE_SHA256 = "ac7acbdd73f974a8b3c7a534254f63b7abd3b7a8204b9f5cebe97fd71c048268"


def test_shipped_test_model_is_the_seed_example_unmodified() -> None:
    shipped = (SHIPPED_MODELS / "test_model" / "main.py").read_text(encoding="utf-8")
    if SEED.is_file():
        example = re.search(
            r"示例：\n```python\n(.*?)```", SEED.read_text(encoding="utf-8"), re.DOTALL
        )
        assert example is not None
        assert shipped == example.group(1)
    assert hashlib.sha256(shipped.encode()).hexdigest() == SEED_EXAMPLE_SHA256


def test_session_attributes_are_bound_before_a_custom_init(tmp_path: Path) -> None:
    class WithInit(AnythingBaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.seen = (self.config["parameters"], self.data_dir)

        async def on_chat_messages(self, messages):  # type: ignore[no-untyped-def]
            yield "x"

    instance = WithInit.create_session_instance(
        config={"parameters": {"a": 1}}, model_dir=tmp_path, resources="shared"
    )
    assert instance.seen == ({"a": 1}, tmp_path / "data")
    assert instance.resources == "shared" and instance.context == {}
    instance.context["k"] = 1
    instance.clear_context()
    assert instance.context == {}


def test_description_is_the_cleaned_class_docstring() -> None:
    class Documented(AnythingBaseModel):
        """First line.

        Indented detail.
        """

    class Undocumented(AnythingBaseModel):
        pass

    assert Documented.description() == "First line.\n\nIndented detail."
    assert Undocumented.description() == ""
