#!/usr/bin/env python3
"""Writes the corpus of token request bodies for the differential test (Python 3 stdlib).

Each output line is {"name": ..., "endpoint": "/sfu/get" | "/get_token", "body_b64": ...}.
The crafted part aims at the places where a JSON reader can disagree with Go's
encoding/json: key case and Unicode folding, duplicate keys, escapes, surrogates, invalid
UTF-8, nesting, data after the first value, number forms for `int` fields, wrong types,
unknown and missing fields, null, mixed body shapes. The fuzzed part mutates valid bodies
with a fixed seed, so the corpus is the same on every run.

usage: gen_corpus.py [--fuzz N] [--seed S] [OUT]   (OUT defaults to stdout)
"""

import argparse
import base64
import json
import random
import sys

ENDPOINTS = ("/sfu/get", "/get_token")
DEFAULT_SEED = 20250611
DEFAULT_FUZZ = 4000


# ---------------------------------------------------------------------------------------
# Bodies as trees whose keys and leaf values are raw JSON text, so that anything can be
# spelled: duplicates, escapes, invalid bytes. An object is a list of [name, key, value]:
# `name` is the field it stands for (for edits), `key` the raw bytes of the key, and `value`
# raw bytes or another object.


def js(value, ascii_only=False):
    """A Python value as JSON text (bytes); lone surrogates pass through as bytes."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def entry(name, value, key=None):
    return [name, js(name) if key is None else key, value]


def render(node):
    if isinstance(node, bytes):
        return node
    return b"{" + b",".join(k + b":" + render(v) for _, k, v in node) + b"}"


def openid():
    return [
        entry("access_token", js("syt_YWxpY2U_token")),
        entry("token_type", js("Bearer")),
        entry("matrix_server_name", js("example.com")),
        entry("expires_in", b"3600"),
    ]


def member():
    return [
        entry("id", js("member-id")),
        entry("claimed_user_id", js("@alice:example.com")),
        entry("claimed_device_id", js("DEVICEID")),
    ]


def legacy(room="!abc:example.com", device="DEVICEID"):
    return [
        entry("room", js(room)),
        entry("openid_token", openid()),
        entry("device_id", js(device)),
    ]


def new(room="!abc:example.com", slot="m.call#ROOM"):
    return [
        entry("room_id", js(room)),
        entry("slot_id", js(slot)),
        entry("openid_token", openid()),
        entry("member", member()),
    ]


def find(node, path):
    """The object holding the last element of `path`, and that element's index (or None)."""
    for name in path[:-1]:
        node = next(v for n, _, v in node if n == name)
    for i, (n, _, _) in enumerate(node):
        if n == path[-1]:
            return node, i
    return node, None


def with_value(body, path, value):
    node, i = find(body, path)
    node[i][2] = value
    return body


def with_key(body, path, key):
    node, i = find(body, path)
    node[i][1] = key
    return body


def without(body, path):
    node, i = find(body, path)
    del node[i]
    return body


def plus(body, path, name, value, key=None):
    """Adds `name` to the object at `path` (an empty path is the top level)."""
    node = body
    for part in path:
        node = next(v for n, _, v in node if n == part)
    node.append(entry(name, value, key))
    return body


SHAPES = {"legacy": legacy, "new": new}

# Every field of each shape, as a path.
FIELDS = {
    "legacy": [("room",), ("openid_token",), ("device_id",)]
    + [("openid_token", f) for f in ("access_token", "token_type", "matrix_server_name", "expires_in")],
    "new": [("room_id",), ("slot_id",), ("openid_token",), ("member",)]
    + [("openid_token", f) for f in ("access_token", "token_type", "matrix_server_name", "expires_in")]
    + [("member", f) for f in ("id", "claimed_user_id", "claimed_device_id")],
}
STRING_FIELDS = {
    shape: [p for p in paths if p[-1] not in ("openid_token", "member", "expires_in")]
    for shape, paths in FIELDS.items()
}
STRUCT_FIELDS = {"legacy": [("openid_token",)], "new": [("openid_token",), ("member",)]}
REQUIRED = {
    "legacy": [("room",), ("device_id",), ("openid_token", "access_token"), ("openid_token", "matrix_server_name")],
    "new": [("room_id",), ("slot_id",), ("openid_token", "access_token"), ("openid_token", "matrix_server_name")]
    + [("member", f) for f in ("id", "claimed_user_id", "claimed_device_id")],
}
DELAY = [("delay_id", js("syd_delay")), ("delay_timeout", b"10000"), ("delay_cs_api_url", js("https://hs.example.com"))]

# Strings whose JSON spelling or hash input is delicate.
INTERESTING_STRINGS = [
    "!abc:example.com",
    "!CsjFU1jpgnkbcyiklV6jftoSxphXpFoiYYAjBb8VbZ8",
    "!a/../b?c#d%2F",
    "<script>&amp;</script>",
    "\u2028\u2029",
    "é€😀 ſK İı",
    "\u0000",
    "\x01\x1f\x7f",
    "\b\f\n\r\t",
    '"\\/',
    "\ufffd",
    " ",
    "m.call#ROOM",
    "\ufeff!bom",
    "a" * 300,
]

NUMBERS = [
    b"0", b"-0", b"1", b"-1", b"3600", b"1.0", b"1.5", b"-1.5", b"1e2", b"1E2", b"1e+2", b"1e-2",
    b"0e0", b"0.0", b"-0.0", b"3600.000", b"36e2", b"9223372036854775807", b"9223372036854775808",
    b"-9223372036854775808", b"-9223372036854775809", b"18446744073709551616", b"1e400", b"-1e400",
    b"0.000000001", b"1" + b"0" * 400, b"01", b"-01", b"+1", b".5", b"1.", b"-", b"--1", b"1e", b"1e+",
    b"0x10", b"Infinity", b"NaN", b"1_000", b"\"3600\"", b"true", b"false", b"[]", b"{}", b"[3600]",
    b"null", b"2147483648", b"-2147483649", b"4294967296",
]


def case_variants(name):
    """Spellings of a field name that Go may or may not match to it."""
    variants = [
        name.upper(),
        name.title(),
        "".join(c.upper() if i % 2 else c for i, c in enumerate(name)),
    ]
    for plain, odd in (("s", "\u017f"), ("S", "\u017f"), ("k", "\u212a"), ("K", "\u212a"), ("i", "\u0130"), ("i", "\u0131")):
        if plain in name:
            variants.append(name.replace(plain, odd, 1))
            variants.append(name.upper().replace(plain.upper(), odd))
    for extra in ("\u1e9e", "\uff52", "\u0280"):  # ẞ, fullwidth r, small capital R: no ASCII fold
        variants.append(extra + name[1:])
    variants += [name + " ", " " + name, name + "\u200b", name + "\x00", name.replace("_", "-"), name.replace("_", "")]
    return variants


def escaped_key(name, which="all"):
    """`name` as a key with \\u escapes (all characters, or every other one)."""
    out = b'"'
    for i, c in enumerate(name):
        if which == "all" or (which == "odd" and i % 2):
            out += b"\\u%04x" % ord(c)
        elif which == "upper":
            out += b"\\u%04X" % ord(c)
        else:
            out += c.encode()
    return out + b'"'


class Corpus:
    def __init__(self):
        self.items = []

    def add(self, name, body, endpoints=ENDPOINTS):
        if not isinstance(body, bytes):
            body = render(body)
        for endpoint in endpoints:
            self.items.append((f"{name} @{endpoint}", endpoint, body))

    def write(self, out):
        for name, endpoint, body in self.items:
            line = {"name": name, "endpoint": endpoint, "body_b64": base64.b64encode(body).decode()}
            out.write(json.dumps(line) + "\n")


def crafted(c):
    # Valid bodies, and delicate values in every string field.
    for shape, make in SHAPES.items():
        c.add(f"valid {shape}", make())
        c.add(f"valid {shape} with delay fields", make() + [entry(n, v) for n, v in DELAY])
        c.add(f"valid {shape} pretty", json.dumps(json.loads(render(make())), indent=2).encode())
        for path in STRING_FIELDS[shape]:
            for i, s in enumerate(INTERESTING_STRINGS):
                c.add(f"{shape} {'.'.join(path)} string #{i}", with_value(make(), path, js(s)))
                c.add(f"{shape} {'.'.join(path)} ascii-escaped string #{i}", with_value(make(), path, js(s, True)))
        c.add(f"{shape} room spelt with escapes",
              with_value(make(), FIELDS[shape][0], b'"\\u0021\\u0061bc\\u003aexample.com\\/x"'))

    # Key spellings at every level.
    for shape, make in SHAPES.items():
        for path in FIELDS[shape]:
            dotted = ".".join(path)
            for v in case_variants(path[-1]):
                c.add(f"{shape} key {dotted} as {v!r}", with_key(make(), path, js(v)))
            for which in ("all", "odd", "upper"):
                c.add(f"{shape} key {dotted} escaped ({which})", with_key(make(), path, escaped_key(path[-1], which)))
            # Escaped fold runes.
            if "s" in path[-1]:
                c.add(f"{shape} key {dotted} with \\u017f", with_key(make(), path, js(path[-1].replace("s", "\u017f"), True)))
            if "k" in path[-1]:
                c.add(f"{shape} key {dotted} with \\u212a", with_key(make(), path, js(path[-1].replace("k", "\u212a"), True)))
            if "i" in path[-1]:
                c.add(f"{shape} key {dotted} with \\u0130", with_key(make(), path, js(path[-1].replace("i", "\u0130"), True)))
            # Invalid UTF-8 and surrogates inside keys.
            c.add(f"{shape} key {dotted} + \\xff", with_key(make(), path, js(path[-1])[:-1] + b'\xff"'))
            c.add(f"{shape} key {dotted} + lone surrogate", with_key(make(), path, js(path[-1])[:-1] + b'\\ud800"'))

    # Key spellings of the optional fields.
    for shape, make in SHAPES.items():
        for name, _ in DELAY:
            for v in case_variants(name):
                c.add(f"{shape} key {name} as {v!r}", with_key(make() + [entry(n, v) for n, v in DELAY], (name,), js(v)))

    # Duplicate keys.
    for shape, make in SHAPES.items():
        room = FIELDS[shape][0]
        r = room[0]
        c.add(f"{shape} dup room, last wins", make() + [entry(r, js("!second:example.com"))])
        c.add(f"{shape} dup room upper-case, last wins", make() + [entry(r, js("!second"), js(r.upper()))])
        c.add(f"{shape} dup room null keeps", make() + [entry(r, b"null")])
        c.add(f"{shape} dup room empty", make() + [entry(r, js(""))])
        c.add(f"{shape} dup room first empty", [entry(r, js(""))] + make())
        c.add(f"{shape} dup room first other", [entry(r, js("!first"))] + make())
        c.add(f"{shape} dup room escaped key", make() + [entry(r, js("!esc"), escaped_key(r))])
        c.add(f"{shape} dup room number", make() + [entry(r, b"1")])
        c.add(f"{shape} dup openid merges",
              with_value(make(), ("openid_token",), [entry("access_token", js("a"))]) + [entry("openid_token", [entry("matrix_server_name", js("hs"))])])
        c.add(f"{shape} dup openid null keeps", make() + [entry("openid_token", b"null")])
        c.add(f"{shape} dup openid empty keeps", make() + [entry("openid_token", b"{}")])
        c.add(f"{shape} dup openid blanks token", make() + [entry("openid_token", [entry("access_token", js(""))])])
        c.add(f"{shape} dup openid string", make() + [entry("openid_token", js("x"))])
        c.add(f"{shape} dup openid inner dup", with_value(make(), ("openid_token",), openid() + [entry("matrix_server_name", js("other.example"))]))
        if shape == "new":
            c.add("new dup member merges",
                  with_value(make(), ("member",), [entry("id", js("m1"))]) + [entry("member", [entry("claimed_user_id", js("@b:x")), entry("claimed_device_id", js("D2"))])])
            c.add("new dup member null keeps", make() + [entry("member", b"null")])
            c.add("new dup member id", with_value(make(), ("member",), member() + [entry("ID", js("m2"))]))
            c.add("new dup slot", make() + [entry("SLOT_ID", js("slot-2")), entry("slot_id", b"null")])
        else:
            c.add("legacy dup device", make() + [entry("DEVICE_ID", js("DEV2"))])
            c.add("legacy dup device empty", make() + [entry("device_id", js(""))])

    # Surrogates and invalid UTF-8 in values.
    surrogates = [b"\\ud83d\\ude00", b"\\ud83d", b"\\ude00", b"\\ude00\\ud83d", b"\\ud83d\\u0041", b"\\ud83d\\ud83d\\ude00",
                  b"\\ud800\\udc00", b"\\udbff\\udfff", b"\\uD83D\\uDE00", b"\\ud83dx", b"\\ud83d\\n", b"\\ud83d\\", b"\\ud83d\\u12",
                  b"\\u0000", b"\\u00e9", b"\\uFFFF", b"\\ufffd", b"\\u2028", b"\\u003c"]
    raw_bytes = [b"\xff", b"\xfe", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                 b"\xf4\x90\x80\x80", b"\xf5\x80", b"\xe2\x82x", b"\xe2\x82", b"\xf0\x9f\x98", b"\x80", b"\xf0\x9f\x98\x80",
                 b"\xc3\xa9\xff\xc3", b"\xef\xbf\xbd", b"\xe2\x80\xa8", b"\x7f", b"\x1f", b"\t"]
    for shape, make in SHAPES.items():
        for path in STRING_FIELDS[shape][:2] + [STRING_FIELDS[shape][-1]]:
            for i, s in enumerate(surrogates):
                c.add(f"{shape} {'.'.join(path)} escape #{i}", with_value(make(), path, b'"!r' + s + b'"'))
            for i, s in enumerate(raw_bytes):
                c.add(f"{shape} {'.'.join(path)} raw bytes #{i}", with_value(make(), path, b'"!r' + s + b'z"'))

    # Nesting.
    for shape, make in SHAPES.items():
        for depth in (1, 2, 5, 30, 31, 32, 33, 40, 100, 9999, 10000, 10001):
            c.add(f"{shape} unknown field nested {depth}", make() + [entry("x", b"[" * depth + b"]" * depth)])
            c.add(f"{shape} room nested {depth}", with_value(make(), FIELDS[shape][0], b"[" * depth + b"]" * depth))
        c.add(f"{shape} nested objects", make() + [entry("x", b'{"a":' * 50 + b"1" + b"}" * 50)])
        c.add(f"{shape} unterminated nesting", make() + [entry("x", b"[" * 50)])
        c.add(f"{shape} openid expires nested", with_value(make(), ("openid_token", "expires_in"), b"[[[1]]]"))

    # Data after the first value.
    trailers = [b"", b" ", b"\n", b"garbage", b"{", b"}", b"]", b'{"room":"!other","room_id":"!other"}', b",", b"\x00",
                b"\xff", b"null", b"/* c */", b"\r\n\r\n", b'"', b"[1,2"]
    for shape, make in SHAPES.items():
        for i, t in enumerate(trailers):
            c.add(f"{shape} trailer #{i}", render(make()) + t)

    # Number forms in int fields.
    for shape, make in SHAPES.items():
        for n in NUMBERS:
            c.add(f"{shape} expires_in {n[:30]!r}", with_value(make(), ("openid_token", "expires_in"), n))
            c.add(f"{shape} delay_timeout {n[:30]!r}", make() + [entry("delay_timeout", n)])
        for n in NUMBERS[:12]:
            c.add(f"{shape} room as number {n!r}", with_value(make(), FIELDS[shape][0], n))

    # What comes before the value.
    prefixes = [b"\xef\xbb\xbf", b" \t\r\n", b"\x0c", b"\x0b", b"\xc2\xa0", b"\x00", b"\xfe\xff", b"\xef\xbb\xbf\xef\xbb\xbf"]
    for shape, make in SHAPES.items():
        for i, p in enumerate(prefixes):
            c.add(f"{shape} prefix #{i}", p + render(make()))
        c.add(f"{shape} whitespace everywhere", render(make()).replace(b":", b" \n:\t ").replace(b",", b"\r ,  "))

    # Huge values.
    for shape, make in SHAPES.items():
        room = FIELDS[shape][0]
        c.add(f"{shape} room 64 KiB", with_value(make(), room, js("!" + "r" * 65536)))
        c.add(f"{shape} room 1 MiB", with_value(make(), room, js("!" + "é" * (1 << 19))))
        c.add(f"{shape} room 16 KiB of escapes", with_value(make(), room, b'"' + b"\\u0041\\n" * 2048 + b'"'))
        c.add(f"{shape} unknown key 64 KiB", make() + [entry("k" * 65536, js("x"))])
        c.add(f"{shape} expires_in 10k digits", with_value(make(), ("openid_token", "expires_in"), b"9" * 10000))
        c.add(f"{shape} 100 KiB of whitespace", b" " * 102400 + render(make()))
        c.add(f"{shape} 2000 duplicate rooms", make() + [entry(room[0], js(f"!r{i}")) for i in range(2000)])

    # Unknown fields at every level.
    unknown_top = ["extra", "room_", "roomid", "room_idx", "device", "slot", "user_id", "delay", "Room Id", "openid", ""]
    for shape, make in SHAPES.items():
        for name in unknown_top:
            c.add(f"{shape} unknown top {name!r}", make() + [entry(name, js("x"))])
        c.add(f"{shape} unknown top null", make() + [entry("extra", b"null")])
        c.add(f"{shape} unknown top object", make() + [entry("extra", b'{"room":"!x"}')])
        c.add(f"{shape} unknown top first", [entry("extra", b"1")] + make())
        for name in ("extra", "access-token", "accesstoken", "device_id", "room", "expires"):
            c.add(f"{shape} unknown in openid {name!r}", plus(make(), ("openid_token",), name, js("x")))
        c.add(f"{shape} unknown in openid null", plus(make(), ("openid_token",), "extra", b"null"))
    for name in ("extra", "user_id", "device_id", "ID ", "claimed_user", "room_id", "member_id"):
        c.add(f"new unknown in member {name!r}", plus(new(), ("member",), name, js("x")))
    c.add("new unknown in member null", plus(new(), ("member",), "extra", b"null"))

    # null everywhere.
    for shape, make in SHAPES.items():
        for path in FIELDS[shape]:
            c.add(f"{shape} {'.'.join(path)} null", with_value(make(), path, b"null"))
        for n, _ in DELAY:
            c.add(f"{shape} {n} null", make() + [entry(n, b"null")])
        c.add(f"{shape} all null", [entry(n, b"null") for n, _, _ in make()])
    for body in (b"null", b" null ", b"nullx", b"null{}"):
        c.add(f"top-level {body!r}", body)

    # Mixed shapes.
    mixes = {
        "legacy + room_id": legacy() + [entry("room_id", js("!other"))],
        "legacy + slot_id": legacy() + [entry("slot_id", js("s"))],
        "legacy + member": legacy() + [entry("member", member())],
        "legacy + member null": legacy() + [entry("member", b"null")],
        "new + room": new() + [entry("room", js("!other"))],
        "new + device_id": new() + [entry("device_id", js("D"))],
        "new + room null": new() + [entry("room", b"null")],
        "both complete": legacy() + new()[:2] + [new()[3]],
        "legacy keys under new names": [entry("room_id", js("!r")), entry("openid_token", openid()), entry("device_id", js("D"))],
        "new without member, with device": [entry("room_id", js("!r")), entry("slot_id", js("s")), entry("openid_token", openid()), entry("device_id", js("D"))],
        "legacy with ROOM_ID key spelled ROOM": [entry("room", js("!r"), js("ROOM")), entry("openid_token", openid()), entry("device_id", js("D"))],
        "legacy room key with dotless i room_id": legacy() + [entry("room_id", js("!x"), js("room_\u0131d"))],
        "new room_id key with dotted I": with_key(new(), ("room_id",), js("ROOM_\u0130D")),
    }
    for name, body in mixes.items():
        c.add(f"mixed {name}", body)

    # Wrong types.
    for shape, make in SHAPES.items():
        for path in STRING_FIELDS[shape]:
            for v in (b"1", b"true", b"[]", b"{}", b'[""]', b"1.5", b'{"a":"b"}'):
                c.add(f"{shape} {'.'.join(path)} = {v!r}", with_value(make(), path, v))
        for path in STRUCT_FIELDS[shape]:
            for v in (b'"x"', b'""', b"1", b"true", b"[]", b"[{}]"):
                c.add(f"{shape} {'.'.join(path)} = {v!r}", with_value(make(), path, v))
        for n, _ in DELAY:
            for v in (b"1", b'"x"', b"true", b"[]", b"{}", b"1.5"):
                c.add(f"{shape} {n} = {v!r}", make() + [entry(n, v)])

    # Missing and empty required (and optional) fields.
    for shape, make in SHAPES.items():
        for path in FIELDS[shape]:
            c.add(f"{shape} without {'.'.join(path)}", without(make(), path))
        for path in REQUIRED[shape]:
            c.add(f"{shape} empty {'.'.join(path)}", with_value(make(), path, js("")))
        c.add(f"{shape} empty token_type", with_value(make(), ("openid_token", "token_type"), js("")))
        c.add(f"{shape} empty object", b"{}")
        c.add(f"{shape} only openid", [entry("openid_token", openid())])
        for n, v in DELAY:
            c.add(f"{shape} only {n}", make() + [entry(n, v)])

    # Not an object, or not JSON.
    for i, body in enumerate([
        b"", b" ", b"[]", b"[{}]", b'""', b'"x"', b"1", b"-1", b"true", b"false", b"{", b"}", b'{"room"}',
        b'{"room":}', b'{"room":"!r",}', b'{"room":"!r" "device_id":"D"}', b"{'room':'!r'}", b'{room:"!r"}',
        b'{"room":"!r\x01"}', b'{"room":"\\x41"}', b'{"room":"\\u12"}', b'{"room":"\\U0041"}', b'{"room":"!r"',
        b'{"room":"!r"//c\n}', b'{"room":tru}', b'{"room":nul}', b'{"room":NULL}', b'{"room":True}', b'{,}',
        b'{"a":1,,"b":2}', b"\x00", b"\xff", b'{"room":"\t"}', b'{"room":"\x7f"}', b'{"\x01":1}', b'{"room":"a\nb"}',
        b'{"room":"!r","openid_token":{"access_token":"a","matrix_server_name":"s"},"device_id":"D"',
        b'{"room" : "!r" , "openid_token" : { "access_token" : "a" , "matrix_server_name" : "s" } , "device_id" : "D" }',
    ]):
        c.add(f"syntax #{i}", body)


# ---------------------------------------------------------------------------------------
# Fuzzing: random edits of valid bodies.

FIELD_NAMES = sorted({p[-1] for paths in FIELDS.values() for p in paths} | {n for n, _ in DELAY})
ODD_CHARS = ["\u017f", "\u212a", "\u0130", "\u0131", "\u00e9", "\ufffd", "\x00", "\n", '"', "\\", "<", "\u2028", "😀", "\ud800", "\udc00"]
RAW_JUNK = [b"\xff", b"\xc0", b"\xed\xa0\x80", b"\xe2\x82", b"\\", b'"', b"{", b"}", b"[", b"]", b",", b":", b" ", b"\x00",
            b"\\u", b"\\ud800", b"null", b"1e5", b"-", b"0"]


def random_string(rng):
    choice = rng.random()
    if choice < 0.4:
        return rng.choice(INTERESTING_STRINGS[:14])
    if choice < 0.5:
        return ""
    return "".join(rng.choice(ODD_CHARS + list("!abc:xyz.@#/ ")) for _ in range(rng.randint(1, 12)))


def random_scalar(rng):
    return rng.choice([
        lambda: js(random_string(rng), rng.random() < 0.5),
        lambda: rng.choice(NUMBERS),
        lambda: b"null",
        lambda: rng.choice([b"true", b"false", b"[]", b"{}", b'["x"]', b'{"id":"x"}']),
    ])()


def random_key(rng, name):
    roll = rng.random()
    if roll < 0.35:
        return js(rng.choice(case_variants(name)), rng.random() < 0.3)
    if roll < 0.5:
        return escaped_key(name, rng.choice(["all", "odd", "upper"]))
    if roll < 0.7:
        chars = list(name)
        i = rng.randrange(len(chars))
        chars[i] = rng.choice(ODD_CHARS + [chars[i].upper(), chars[i].swapcase()])
        return js("".join(chars), rng.random() < 0.3)
    return js(rng.choice(FIELD_NAMES))


def objects(node):
    """Every object in the tree (the top level first)."""
    found = [node]
    for _, _, v in node:
        if isinstance(v, list):
            found += objects(v)
    return found


def mutate_tree(rng, body):
    obj = rng.choice(objects(body))
    op = rng.randrange(9)
    if op == 0 and obj:  # respell a key
        e = rng.choice(obj)
        e[1] = random_key(rng, e[0])
    elif op == 1 and obj:  # repeat a field with another value
        e = rng.choice(obj)
        obj.insert(rng.randint(0, len(obj)), [e[0], rng.choice([e[1], random_key(rng, e[0])]), random_scalar(rng)])
    elif op == 2 and obj:  # drop a field
        del obj[rng.randrange(len(obj))]
    elif op == 3 and obj:  # another value
        e = rng.choice(obj)
        e[2] = random_scalar(rng) if rng.random() < 0.6 or not isinstance(e[2], bytes) else js(random_string(rng))
    elif op == 4:  # a field that may not belong here
        name = rng.choice(FIELD_NAMES + ["extra", "room", "room_id", "member", "device_id"])
        value = random_scalar(rng) if name not in ("openid_token", "member") or rng.random() < 0.3 else (openid() if name == "openid_token" else member())
        obj.insert(rng.randint(0, len(obj)), [name, random_key(rng, name) if rng.random() < 0.3 else js(name), value])
    elif op == 5:  # reorder
        rng.shuffle(obj)
    elif op == 6 and obj:  # a delicate string
        e = rng.choice(obj)
        if isinstance(e[2], bytes) and e[2].startswith(b'"'):
            e[2] = js(random_string(rng), rng.random() < 0.5)
    elif op == 7:  # the delay fields
        name, value = rng.choice(DELAY)
        obj.append([name, js(name), value if rng.random() < 0.7 else random_scalar(rng)])
    elif op == 8 and obj:  # a nested object merged again
        e = rng.choice(obj)
        if e[0] in ("openid_token", "member"):
            obj.append([e[0], e[1], [list(x) for x in rng.sample(e[2], k=min(len(e[2]), rng.randint(0, 2)))] if isinstance(e[2], list) else b"null"])


def mutate_bytes(rng, body):
    op = rng.randrange(6)
    at = rng.randint(0, len(body))
    if op == 0 and body:  # flip a byte
        i = rng.randrange(len(body))
        return body[:i] + bytes([body[i] ^ (1 << rng.randrange(8))]) + body[i + 1:]
    if op == 1:
        return body[:at] + rng.choice(RAW_JUNK) + body[at:]
    if op == 2 and body:
        return body[:at] + body[at + rng.randint(1, 4):]
    if op == 3:
        return body[:at]
    if op == 4:
        return body + rng.choice(RAW_JUNK + [b"{}", b" x"])
    return body[:at] + rng.choice([b" ", b"\n", b"\t", b"\r"]) + body[at:]


def fuzzed(c, count, seed):
    rng = random.Random(seed)
    for i in range(count):
        shape = rng.choice(["legacy", "new"])
        body = SHAPES[shape]()
        if rng.random() < 0.3:
            body += [entry(n, v) for n, v in DELAY if rng.random() < 0.5]
        for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3, 4])):
            mutate_tree(rng, body)
        raw = render(body)
        if rng.random() < 0.15:
            for _ in range(rng.randint(1, 2)):
                raw = mutate_bytes(rng, raw)
        c.add(f"fuzz #{i} ({shape})", raw, (rng.choice(ENDPOINTS),))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="output file (default: stdout)")
    parser.add_argument("--fuzz", type=int, default=DEFAULT_FUZZ, help="number of fuzzed bodies")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="fuzzing seed")
    args = parser.parse_args()
    corpus = Corpus()
    crafted(corpus)
    n_crafted = len(corpus.items)
    fuzzed(corpus, args.fuzz, args.seed)
    if args.out:
        with open(args.out, "w", encoding="ascii") as out:
            corpus.write(out)
    else:
        corpus.write(sys.stdout)
    print(f"gen_corpus: {n_crafted} crafted + {len(corpus.items) - n_crafted} fuzzed bodies", file=sys.stderr)


if __name__ == "__main__":
    main()
