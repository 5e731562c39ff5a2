"""The protos are the API for other languages: stubs current, every field and enum documented."""

import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from conftest import REPO

PROTO_ROOT = REPO / "protos"
PROTO_FILES = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "mirador" / "v1").glob("*.proto"))


def test_committed_stubs_match_a_fresh_generation():
    result = subprocess.run(
        [sys.executable, str(PROTO_ROOT / "generate_python.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main([
            "protoc", f"-I{PROTO_ROOT}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            "--include_source_info", f"--descriptor_set_out={out}", *PROTO_FILES,
        ])
        assert code == 0
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _commented_paths(file: descriptor_pb2.FileDescriptorProto) -> set[tuple[int, ...]]:
    return {
        tuple(loc.path) for loc in file.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }


def test_every_message_field_enum_value_and_rpc_is_commented():
    undocumented = []
    for file in _descriptor_set().file:
        commented = _commented_paths(file)
        for m_index, message in enumerate(file.message_type):
            for f_index, field in enumerate(message.field):
                if (4, m_index, 2, f_index) not in commented:
                    undocumented.append(f"{file.name}: {message.name}.{field.name}")
        for e_index, enum in enumerate(file.enum_type):
            for v_index, value in enumerate(enum.value):
                if v_index and (5, e_index, 2, v_index) not in commented:  # *_UNSPECIFIED explains itself
                    undocumented.append(f"{file.name}: {enum.name}.{value.name}")
        for s_index, service in enumerate(file.service):
            for r_index, method in enumerate(service.method):
                if (6, s_index, 2, r_index) not in commented:
                    undocumented.append(f"{file.name}: {service.name}.{method.name}")
    assert not undocumented, "add a comment to: " + ", ".join(undocumented)


def test_every_enum_starts_with_unspecified_zero():
    for file in _descriptor_set().file:
        for enum in file.enum_type:
            first = enum.value[0]
            assert first.number == 0 and first.name.endswith("_UNSPECIFIED"), f"{file.name}: {enum.name}"


def test_services_in_package_mirador_v1():
    services = {s.name: s for f in _descriptor_set().file if f.package == "mirador.v1" for s in f.service}
    # the four services, and the rollout control the router process serves beside Router
    assert set(services) == {"Router", "ModelHost", "Consensus", "Quantizer", "Rollouts"}
    streaming = {(s, m.name) for s, d in services.items() for m in d.method if m.server_streaming}
    assert streaming == {("Router", "Ask"), ("ModelHost", "Generate"), ("Consensus", "Decide"), ("Quantizer", "Quantize")}
