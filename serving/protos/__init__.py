"""Python modules for generation.proto, generated when first imported.

`load()` compiles serving/protos/generation.proto with grpcio-tools' bundled protoc, in memory,
through grpc.protos_and_services, so the message classes always match the protobuf and grpcio
versions installed: no generated code is committed. The modules are named generation_pb2 and
generation_pb2_grpc, as protoc names them for this file.
"""
from __future__ import annotations

import functools
import os
import sys

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def load():
    """-> (generation_pb2, generation_pb2_grpc)"""
    import grpc

    if PROTO_DIR not in sys.path:
        sys.path.append(PROTO_DIR)  # where grpc_tools looks for generation.proto
    return grpc.protos_and_services("generation.proto")
