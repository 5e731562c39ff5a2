"""The bytes of a real gRPC health check, for HAProxy's raw `tcp-check`.

HAProxy's `option httpchk` cannot speak gRPC (it sends HTTP/1.1, or an h2 request
without a body, and cannot read trailers). But a gRPC health check is only a few
fixed HTTP/2 frames on a fresh connection, so `tcp-check send-binary` can send
them verbatim and `tcp-check expect binary` can look for the SERVING answer:

    client → server
      1. the HTTP/2 connection preface  "PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n"
      2. SETTINGS (empty)
      3. HEADERS, stream 1, END_HEADERS, HPACK without Huffman or dynamic table:
           :method POST  :scheme http  :path /grpc.health.v1.Health/Check
           :authority <authority>  content-type application/grpc  te trailers
      4. DATA, stream 1, END_STREAM: the 5-byte gRPC prefix (uncompressed, length)
           + HealthCheckRequest{service: "mirador.v1.ModelHost"}
    server → client
      SETTINGS, HEADERS (:status 200; HPACK, maybe Huffman: not matched), then
      DATA whose payload is  00 00000002 0801  = HealthCheckResponse{status: SERVING}
      (NOT_SERVING would be ... 0802, SERVICE_UNKNOWN ... 0803; an unknown service
      name gets no DATA at all, only a NOT_FOUND trailer), then trailers.

`expect binary` matches anywhere in what has arrived, so the server's own SETTINGS
and HEADERS, whatever their encoding, do not matter; only a SERVING message
matches. Run this file to print the hex strings for haproxy.cfg:

    python deploy/haproxy/grpc_health_check.py [--service mirador.v1.ModelHost]
"""

from __future__ import annotations

import argparse
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_DATA, FRAME_HEADERS, FRAME_SETTINGS = 0x0, 0x1, 0x4
FLAG_END_STREAM, FLAG_END_HEADERS = 0x1, 0x4
SERVING = 1


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """An HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload (RFC 9113 §4.1)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def hpack_int(value: int, prefix_bits: int, first_byte_flags: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 §5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    out = [first_byte_flags | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(text: str) -> bytes:
    """A string literal without Huffman coding (H bit 0)."""
    data = text.encode("ascii")
    return hpack_int(len(data), 7, 0x00) + data


def hpack_indexed(index: int) -> bytes:
    """A header field from the static table, name and value (RFC 7541 §6.1)."""
    return hpack_int(index, 7, 0x80)


def hpack_literal(name_index: int | str, value: str) -> bytes:
    """A literal header field without indexing (§6.2.2), the name indexed or literal."""
    if isinstance(name_index, int):
        return hpack_int(name_index, 4, 0x00) + hpack_string(value)
    return b"\x00" + hpack_string(name_index) + hpack_string(value)


# HPACK static table indexes (RFC 7541 Appendix A)
_AUTHORITY, _METHOD_POST, _PATH, _SCHEME_HTTP, _CONTENT_TYPE = 1, 3, 4, 6, 31


def health_check_request(service: str, authority: str = "localhost") -> bytes:
    """Everything the client sends, as one byte string."""
    headers = b"".join([
        hpack_indexed(_METHOD_POST),
        hpack_indexed(_SCHEME_HTTP),
        hpack_literal(_PATH, "/grpc.health.v1.Health/Check"),
        hpack_literal(_AUTHORITY, authority),
        hpack_literal(_CONTENT_TYPE, "application/grpc"),
        hpack_literal("te", "trailers"),
    ])
    name = service.encode()
    message = (b"\x0a" + bytes([len(name)]) + name) if name else b""  # field 1 (service), wire type 2
    assert len(name) < 128, "a longer service name needs a varint length"
    grpc_message = b"\x00" + struct.pack(">I", len(message)) + message
    return b"".join([
        PREFACE,
        frame(FRAME_SETTINGS, 0, 0, b""),
        frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, headers),
        frame(FRAME_DATA, FLAG_END_STREAM, 1, grpc_message),
    ])


def serving_response_message() -> bytes:
    """The gRPC message a SERVING server sends: uncompressed, length 2, field 1 (status) = 1."""
    return b"\x00" + struct.pack(">I", 2) + bytes([0x08, SERVING])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", default="mirador.v1.ModelHost")
    parser.add_argument("--authority", default="localhost")
    args = parser.parse_args(argv)
    print(f"tcp-check send-binary {health_check_request(args.service, args.authority).hex()}")
    print(f"tcp-check expect binary {serving_response_message().hex()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
