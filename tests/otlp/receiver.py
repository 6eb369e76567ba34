#!/usr/bin/env python3
"""An OTLP trace receiver for the tests: the OpenTelemetry project's own
protobuf and gRPC definitions (the opentelemetry-proto package) behind a
gRPC server and an HTTP server (POST /v1/traces, protobuf). Every span
received is appended to a file as one JSON line.

    receiver.py GRPC_PORT HTTP_PORT OUT_FILE
"""
import http.server
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsg

GRPC_PORT, HTTP_PORT, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def record(request, via):
    with lock, open(OUT, "a") as out:
        for rs in request.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.write(json.dumps({
                        "via": via,
                        "service": resource.get("service.name"),
                        "scope": ss.scope.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status": s.status.code,
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                    }) + "\n")


class Traces(tsg.TraceServiceServicer):
    def Export(self, request, context):
        record(request, "grpc")
        return ts.ExportTraceServiceResponse()


class Http(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(415)
            self.end_headers()
            return
        request = ts.ExportTraceServiceRequest()
        request.ParseFromString(body)
        record(request, "http")
        answer = ts.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
tsg.add_TraceServiceServicer_to_server(Traces(), server)
server.add_insecure_port(f"127.0.0.1:{GRPC_PORT}")
server.start()
http.server.ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), Http).serve_forever()
