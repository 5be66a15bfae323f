"""Thousands of BeginDrain calls with distinct requesters, then GetNodeHealth and GetDrainStatus,
from Python grpcio with its default limits (4 MiB per received message), message classes built
from server reflection as in reflect_client.py. Prints one JSON object for the Rust test.

Usage: drain_flood_client.py TARGET CALLS
"""

import json
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from reflect_client import ReflectionV1Stub

SERVICE = "nodeward.v1.NodeHealth"


def main():
    target, calls = sys.argv[1], int(sys.argv[2])
    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")])
    db = ProtoReflectionDescriptorDatabase(channel)
    db._stub = ReflectionV1Stub(channel)
    pool = DescriptorPool(db)

    def rpc(method):
        md = pool.FindServiceByName(SERVICE).FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(md.input_type)
        resp_cls = message_factory.GetMessageClass(md.output_type)
        stub = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        return lambda **fields: stub(req_cls(**fields), timeout=30)

    begin = rpc("BeginDrain")
    # Long reasons, as a real controller's may be: 5,000 of them are far past 4 MiB.
    reason = "r" * 1000
    for i in range(calls):
        begin(requested_by=f"controller-{i:05d}", reason=reason, deadline_seconds=3600)

    out = {}
    for method in ("GetNodeHealth", "GetDrainStatus"):
        try:
            reply = rpc(method)()
        except grpc.RpcError as e:
            out[method] = {"code": e.code().name, "details": e.details()}
            continue
        drain = reply.health.drain if method == "GetNodeHealth" else reply.drain
        out[method] = {
            "code": "OK",
            "bytes": reply.ByteSize(),
            "requesters": len(drain.requesters),
            "first": drain.requesters[0].requested_by if drain.requesters else "",
            "requesters_not_kept": drain.requesters_not_kept,
        }
        if method == "GetDrainStatus":
            out[method]["live_streams"] = reply.live_streams
            out[method]["listed"] = sum(len(c.streams) for c in reply.containers)
            out[method]["truncated"] = reply.truncated
    print(json.dumps(out))


if __name__ == "__main__":
    main()
