"""A generic gRPC client that is not ours: it discovers the crabboxd API by
server reflection (no .proto files, no generated code) and calls GetStatus
and ListTasks over the daemon's Unix socket, printing the replies as JSON.

Usage: python3 generic_client.py /path/to/crabboxd.sock
"""

import json
import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "crabbox.daemon.v1.Daemon"


def main() -> None:
    # The default authority of a unix: target is the socket path, which is
    # not a valid HTTP/2 :authority; name the host explicitly.
    channel = grpc.insecure_channel(
        f"unix:{sys.argv[1]}", options=[("grpc.default_authority", "localhost")]
    )
    db = ProtoReflectionDescriptorDatabase(channel)
    services = list(db.get_services())
    pool = DescriptorPool(db)
    svc = pool.FindServiceByName(SERVICE)

    def call(name: str):
        method = svc.FindMethodByName(name)
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        resp, info = rpc.with_call(req_cls(), timeout=10)
        return (
            json_format.MessageToDict(resp, preserving_proto_field_name=True),
            {k: v for k, v in info.initial_metadata()},
        )

    status, metadata = call("GetStatus")
    tasks, _ = call("ListTasks")
    print(json.dumps({"services": services, "status": status, "tasks": tasks, "metadata": metadata}))


if __name__ == "__main__":
    main()
