"""A client of portcullis's native API that is not ours: Python grpcio, with stubs generated
from the committed proto/portcullis/v1/decision.proto by grpcio-tools at run time.

    python native_client.py ADDRESS API_KEY

Prints one JSON object: what a Check, a bad Check and two Completes answered, then a Check that
reserves an estimate and the Complete that settles it.
"""

import importlib
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def stubs():
    proto_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
    out = tempfile.mkdtemp(prefix="portcullis-py-")
    code = protoc.main([
        "protoc",
        f"-I{proto_root}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "portcullis/v1/decision.proto",
    ])
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")
    sys.path.insert(0, out)
    return (importlib.import_module("portcullis.v1.decision_pb2"),
            importlib.import_module("portcullis.v1.decision_pb2_grpc"))


def main():
    address, api_key = sys.argv[1], sys.argv[2]
    pb, rpc = stubs()
    with grpc.insecure_channel(address) as channel:
        client = rpc.DecisionStub(channel)
        allowed = client.Check(pb.CheckRequest(
            api_key=api_key, operation="GET", resource="/api/v1/items", client_address="10.9.8.7",
            request_id="py-1"), timeout=10)
        try:
            client.Check(pb.CheckRequest(api_key=api_key, operation="GET", resource=""), timeout=10)
            bad = {"code": "OK"}
        except grpc.RpcError as e:
            bad = {"code": e.code().name, "details": e.details()}
        first = client.Complete(pb.CompleteRequest(lease=allowed.lease, status_code=200, latency_us=1200,
                                                   request_id="py-1"), timeout=10)
        second = client.Complete(pb.CompleteRequest(lease=allowed.lease, status_code=200, latency_us=1200,
                                                    request_id="py-1"), timeout=10)
        # a cost known only afterwards: 50 reserved, 20 used
        reserved = client.Check(pb.CheckRequest(
            api_key=api_key, operation="GET", resource="/api/v1/items", client_address="10.9.8.7",
            cost=50, reserve=True, request_id="py-2"), timeout=10)
        settled = client.Complete(pb.CompleteRequest(lease=reserved.lease, reservation=reserved.reservation,
                                                     actual_cost=20, status_code=200, request_id="py-2"),
                                  timeout=10)
        after = client.Check(pb.CheckRequest(
            api_key=api_key, operation="GET", resource="/api/v1/items", client_address="10.9.8.7",
            dry_run=True), timeout=10)
    print(json.dumps({
        "verdict": pb.Verdict.Name(allowed.verdict),
        "http_status": allowed.http_status,
        "reason": allowed.reason,
        "subject": allowed.identity.subject,
        "tier": allowed.identity.tier,
        "roles": list(allowed.identity.roles),
        "quotas": [q.name for q in allowed.quotas],
        "lease": allowed.lease,
        "decision_id": allowed.decision_id,
        "upstream_headers": {h.name: h.value for h in allowed.upstream_headers},
        "bad": bad,
        "released": [first.released, second.released],
        "reservation_ttl_ms": reserved.reservation_ttl_ms,
        "settled": [settled.settled, settled.reserved_cost],
        "daily_left": [q.remaining for q in after.quotas if q.name == "daily"],
    }))


if __name__ == "__main__":
    main()
