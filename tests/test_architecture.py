"""Repository-level guarantees: import direction, generated stubs in sync with the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from protocols.wire.v1 import federation_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    """privacy/robustness/protocols never import secure_fl or each other (import-linter)."""
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    """The committed federation_pb2 was generated from the committed federation.proto."""
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "descriptor.pb"
    status = grpc_tools.main(
        ["protoc", "-I", str(ROOT), f"--descriptor_set_out={out}", "protocols/wire/v1/federation.proto"]
    )
    assert status == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(federation_pb2.DESCRIPTOR.serialized_pb)
    _strip_json_names(fresh)  # protoc adds json_name to descriptor sets, not to generated code
    assert fresh == committed, "regenerate with: python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protocols/wire/v1/federation.proto"


def test_cli_help_does_not_import_torch() -> None:
    """`secure-fl --help` stays fast: heavy libraries load lazily."""
    code = "import sys, secure_fl.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False False", done.stdout + done.stderr


def _strip_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    stack = list(file.message_type)
    while stack:
        message = stack.pop()
        for field in message.field:
            field.ClearField("json_name")
        stack.extend(message.nested_type)


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from the config dataclasses and must match them."""
    from secure_fl.config import config_reference

    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == config_reference(), (
        "regenerate docs/configuration.md (command at the top of the file)"
    )
