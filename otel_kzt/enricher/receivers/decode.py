"""Turning request bodies into OTLP messages, all or nothing (nothing half-parsed goes further).

Shared by both receivers: size limits, gzip, zstd and deflate with a decompressed-size cap (a bomb stops
at the limit), protobuf, and OTLP/JSON (lowerCamelCase, 64-bit integers as strings or numbers, integer
enums, trace and span ids as hex).
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any, Final, TypeVar

import zstandard
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from otel_kzt.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
CONTENT_TYPES: Final = (PROTOBUF, JSON)
ENCODINGS: Final = ("gzip", "zstd", "deflate", "identity")
_HEX_ID_KEYS: Final = frozenset({"traceId", "spanId", "parentSpanId"})

M = TypeVar("M", bound=Message)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding (gzip, zstd, deflate); the result may not exceed `limit` bytes (a bomb stops
    at the limit: the decompressors are asked for at most `limit + 1` bytes)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        out = _inflate(body, 16 + zlib.MAX_WBITS, limit, "gzip")
    elif encoding == "deflate":
        # RFC 9110 deflate is zlib-wrapped; some clients send it raw, so try both.
        try:
            out = _inflate(body, zlib.MAX_WBITS, limit, encoding)
        except InvalidRequest:
            out = _inflate(body, -zlib.MAX_WBITS, limit, encoding)
    elif encoding == "zstd":
        out = _unzstd(body, limit)
    else:
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r} ({', '.join(ENCODINGS)})")
    if len(out) > limit:
        raise RequestTooLarge(f"decompressed body exceeds {limit} bytes (max_request_bytes)")
    return out


def _inflate(body: bytes, wbits: int, limit: int, name: str) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"bad {name} body: {exc}") from exc
    if len(out) <= limit and not inflater.eof:
        raise InvalidRequest(f"truncated {name} body")
    return out


def _unzstd(body: bytes, limit: int) -> bytes:
    """Bounded first (a bomb stops at limit + 1 bytes), then once more to learn that the frame ended: the
    zstd stream reader returns a truncated body's prefix without complaint."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            if len(reader.read(limit + 1)) > limit:
                raise RequestTooLarge(f"decompressed body exceeds {limit} bytes (max_request_bytes)")
        inflater = zstandard.ZstdDecompressor().decompressobj()
        out = inflater.decompress(body)
    except zstandard.ZstdError as exc:
        raise InvalidRequest(f"bad zstd body: {exc}") from exc
    if not inflater.eof:
        raise InvalidRequest("truncated zstd body")
    return bytes(out)


def parse(body: bytes, content_type: str, message_type: type[M]) -> M:
    if content_type == PROTOBUF:
        try:
            return message_type.FromString(body)  # type: ignore[no-any-return]
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise InvalidRequest(f"undecodable protobuf: {exc}") from exc
    if content_type == JSON:
        return parse_json(body, message_type)
    raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r} ({', '.join(CONTENT_TYPES)})")


def parse_json(body: bytes, message_type: type[M]) -> M:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidRequest(f"invalid JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("OTLP/JSON body must be an object")
    message: M = message_type()
    try:
        # OTLP/JSON: receivers ignore unknown fields (forward compatibility).
        json_format.ParseDict(_hex_ids_to_base64(data), message, ignore_unknown_fields=True)
        message.ByteSize()  # upb checks nesting depth here too: fail now, not in the core
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise InvalidRequest(f"invalid OTLP/JSON: {exc}") from exc
    return message


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes trace/span ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in _HEX_ID_KEYS and isinstance(value, str) and value:
                try:
                    out[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError as exc:
                    raise InvalidRequest(f"{key} is not hex: {value!r}") from exc
            else:
                out[key] = _hex_ids_to_base64(value)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


def to_body(message: Message, content_type: str) -> bytes:
    if content_type == JSON:
        return str(json_format.MessageToJson(message, indent=None)).encode()
    return bytes(message.SerializeToString())
