"""Drain calls whose requested_by or reason hold newlines and control characters, from Python
grpcio (message classes built from server reflection, as in reflect_client.py).

Each such call must fail with INVALID_ARGUMENT; a last, clean BeginDrain must succeed. Prints
one JSON object for the Rust test to check.

Usage: drain_text_client.py TARGET   (e.g. unix:/run/nodeward/nodeward.sock)
"""

import json
import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from reflect_client import ReflectionV1Stub

SERVICE = "nodeward.v1.NodeHealth"


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    db = ProtoReflectionDescriptorDatabase(channel)
    db._stub = ReflectionV1Stub(channel)
    pool = DescriptorPool(db)

    def call(method, fields):
        md = pool.FindServiceByName(SERVICE).FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(md.input_type)
        resp_cls = message_factory.GetMessageClass(md.output_type)
        rpc = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        try:
            reply = rpc(req_cls(**fields), timeout=10)
        except grpc.RpcError as e:
            return {"code": e.code().name, "details": e.details()}
        return {"code": "OK", "reply": json_format.MessageToDict(reply, preserving_proto_field_name=True)}

    forged = "\n2026-12-07T07:00:00.000000Z  INFO nodeward::api: drain cancelled by admin"
    refused = [
        ("BeginDrain", {"requested_by": "ctl" + forged, "reason": ""}),
        ("BeginDrain", {"requested_by": "ctl", "reason": "upgrade\r" + forged}),
        ("BeginDrain", {"requested_by": "ctl", "reason": "clear \x1b[2J screen"}),
        ("CancelDrain", {"requested_by": "ctl\x00", "reason": ""}),
        ("CancelDrain", {"requested_by": "ctl", "reason": "done" + forged}),
    ]
    out = {
        "refused": [
            dict(call(method, fields), method=method, fields=fields) for method, fields in refused
        ],
        "accepted": call("BeginDrain", {"requested_by": "python/ok", "reason": "kernel upgrade"}),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
