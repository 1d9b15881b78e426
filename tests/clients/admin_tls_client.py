"""A client of portcullis's admin API over TLS that is not ours: Python grpcio, with stubs
generated from the committed proto/portcullis/v1/*.proto at run time.

    python admin_tls_client.py ADDRESS CA_PEM TOKEN [CLIENT_CERT_PEM CLIENT_KEY_PEM]

Prints one JSON object: {"code": "OK" | the gRPC code, "policy_version": ...}.
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
    code = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}",
                        "portcullis/v1/decision.proto", "portcullis/v1/admin.proto"])
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")
    sys.path.insert(0, out)
    return (importlib.import_module("portcullis.v1.admin_pb2"),
            importlib.import_module("portcullis.v1.admin_pb2_grpc"))


def main():
    address, ca, token = sys.argv[1], sys.argv[2], sys.argv[3]
    cert = key = None
    if len(sys.argv) > 5:
        cert, key = open(sys.argv[4], "rb").read(), open(sys.argv[5], "rb").read()
    pb, rpc = stubs()
    creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read(), private_key=key,
                                         certificate_chain=cert)
    with grpc.secure_channel(address, creds) as channel:
        try:
            r = rpc.AdminStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10,
                                                 metadata=[("authorization", f"Bearer {token}")])
            print(json.dumps({"code": "OK", "policy_version": r.policy_version}))
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details()}))


if __name__ == "__main__":
    main()
