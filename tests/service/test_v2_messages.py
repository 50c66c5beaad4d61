"""The gRPC messages the service loads: compiled from the committed .proto files, and what tritonclient speaks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2 as triton

from service.v2.grpc_service import RPCS
from service.v2.messages import SERVICE, messages

ROOT = Path(__file__).resolve().parents[2]


def _compile_script():
    spec = importlib.util.spec_from_file_location("compile_v2_protos", ROOT / "scripts" / "compile_v2_protos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_descriptor_set_is_what_the_proto_files_compile_to():
    script = _compile_script()
    committed = descriptor_pb2.FileDescriptorSet.FromString(script.OUTPUT.read_bytes())
    compiled = descriptor_pb2.FileDescriptorSet.FromString(script.compile_protos())
    assert [f.name for f in committed.file] == ["model_config.proto", "grpc_service.proto"]
    assert committed == compiled, "service/v2/proto/inference.binpb is stale: run scripts/compile_v2_protos.py"


def _fields(descriptor) -> dict[str, tuple[int, int, str]]:
    return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else "") for f in descriptor.fields}


def test_every_served_rpc_and_its_messages_match_tritonclients_on_the_wire():
    ours = messages().service
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == SERVICE
    for name in RPCS:
        mine, client = ours.methods_by_name[name], theirs.methods_by_name[name]
        for a, b in ((mine.input_type, client.input_type), (mine.output_type, client.output_type)):
            assert a.full_name == b.full_name
            shared = _fields(a).keys() & _fields(b).keys()
            assert {k: _fields(a)[k] for k in shared} == {k: _fields(b)[k] for k in shared}, a.full_name


def test_a_request_built_by_tritonclients_messages_parses_into_ours():
    request = triton.ModelInferRequest(model_name="digits", id="x", raw_input_contents=[b"\x01" * 64])
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 8, 8, 1])
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    parsed = messages().ModelInferRequest.FromString(request.SerializeToString())
    assert parsed.model_name == "digits" and parsed.id == "x"
    assert list(parsed.inputs[0].shape) == [1, 8, 8, 1] and parsed.raw_input_contents[0] == b"\x01" * 64
    assert parsed.outputs[0].parameters["classification"].int64_param == 3
