"""A generic gRPC client that is not ours: it discovers the crabboxd API by
server reflection (no .proto files, no generated code), lists the services
through both reflection versions (`grpc.reflection.v1` and `v1alpha`), and
calls one read RPC of each domain service over the daemon's Unix socket,
printing the replies as JSON (well-known types in their JSON forms:
Timestamps as RFC 3339 text, Durations as "10s").

Usage: python3 generic_client.py /path/to/crabboxd.sock
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

PACKAGE = "crabbox.daemon.v1"


def list_services(channel, version: str) -> list:
    """Asks `grpc.reflection.<version>` for the service list. The v1 and
    v1alpha messages are identical on the wire, so the v1alpha classes that
    grpcio-reflection ships serve both."""
    rpc = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(iter(rpc(iter([req]), timeout=10)))
    return sorted(s.name for s in resp.list_services_response.service)


def main() -> None:
    # The default authority of a unix: target is the socket path, which is
    # not a valid HTTP/2 :authority; name the host explicitly.
    channel = grpc.insecure_channel(
        f"unix:{sys.argv[1]}", options=[("grpc.default_authority", "localhost")]
    )
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(db)

    def call(service: str, name: str, request=None):
        svc = pool.FindServiceByName(f"{PACKAGE}.{service}")
        method = svc.FindMethodByName(name)
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/{PACKAGE}.{service}/{name}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        req = req_cls()
        if request:
            json_format.ParseDict(request, req)
        try:
            resp, info = rpc.with_call(req, timeout=10)
        except grpc.RpcError as e:
            return {
                "code": e.code().name,
                "message": e.details(),
                "trailers": {k: v for k, v in e.trailing_metadata() or ()},
            }, {}
        return (
            json_format.MessageToDict(resp, preserving_proto_field_name=True),
            {k: v for k, v in info.initial_metadata()},
        )

    status, metadata = call("Daemon", "GetStatus")
    tasks, _ = call("Daemon", "ListTasks")
    leases, _ = call("Leases", "ListLeases")
    hosts, _ = call("Egress", "ListEgressHosts")
    print(
        json.dumps(
            {
                "services": list_services(channel, "v1alpha"),
                "services_v1": list_services(channel, "v1"),
                "status": status,
                "tasks": tasks,
                "leases": leases,
                "egress_hosts": hosts,
                "metadata": metadata,
            }
        )
    )


if __name__ == "__main__":
    main()
