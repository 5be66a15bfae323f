"""An independent gRPC client for nodeward: Python grpcio, no generated code.

It discovers the API through server reflection (the v1 service, grpc.reflection.v1), builds the
message classes from the descriptors it received, and calls nodeward.v1.NodeHealth/GetNodeHealth
and grpc.health.v1.Health/Check. Prints one JSON object for the Rust test to check.

Usage: reflect_client.py TARGET   (e.g. unix:/run/nodeward/nodeward.sock or 127.0.0.1:50051)
"""

import json
import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


class ReflectionV1Stub:
    """grpcio-reflection's client speaks v1alpha; v1 has the same messages under a new name."""

    def __init__(self, channel):
        self.ServerReflectionInfo = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    db = ProtoReflectionDescriptorDatabase(channel)
    db._stub = ReflectionV1Stub(channel)
    pool = DescriptorPool(db)

    def call(service, method, fields):
        md = pool.FindServiceByName(service).FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(md.input_type)
        resp_cls = message_factory.GetMessageClass(md.output_type)
        rpc = channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        reply = rpc(req_cls(**fields), timeout=10)
        return json_format.MessageToDict(reply, preserving_proto_field_name=True)

    out = {
        "services": sorted(db.get_services()),
        "health": call("nodeward.v1.NodeHealth", "GetNodeHealth", {}),
        "check_server": call("grpc.health.v1.Health", "Check", {"service": ""}),
        "check_node_health": call(
            "grpc.health.v1.Health", "Check", {"service": "nodeward.v1.NodeHealth"}
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
