#!/usr/bin/python3
"""A gRPC server and a long-lived gRPC client for root_sock_destroy.rs (Debian's python3-grpcio).

No generated code: one unary method `/t.Where/Who` with raw bytes in and out (grpcio's
generic handlers), answering `NAME PEER` (PEER: the client's address as the server sees it,
so a client can tell whether its calls still use the same connection).

  grpc_where.py serve NAME HOST:PORT        serves until killed; prints "listening" when up
  grpc_where.py client TARGET INTERVAL_MS STOPFILE
      one channel (one HTTP/2 connection, reconnected by grpc as it does) to TARGET; a call
      every INTERVAL_MS until STOPFILE exists; one JSON line per call on stdout:
      {"at_ms": unix ms, "ok": bool, "server": NAME, "peer": PEER, "code": grpc code}
"""
import json
import os
import sys
import time
from concurrent import futures

import grpc

METHOD = "/t.Where/Who"


def serve(name, addr):
    def who(request, context):
        return f"{name} {context.peer()}".encode()

    handler = grpc.method_handlers_generic_handler(
        "t.Where", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def client(target, interval_ms, stopfile):
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary(METHOD)
    while not os.path.exists(stopfile):
        rec = {"at_ms": int(time.time() * 1000)}
        try:
            name, peer = who(b"", timeout=1.0).decode().split(" ", 1)
            rec.update(ok=True, server=name, peer=peer)
        except grpc.RpcError as e:
            rec.update(ok=False, code=str(e.code()))
        print(json.dumps(rec), flush=True)
        time.sleep(interval_ms / 1000.0)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "client":
        client(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
