"""Property-based: random overrides and random YAML thrown at ``load_config``. A config is
either accepted (a RunConfig) or rejected with a ``ConfigError`` whose message is one line and
names the key at fault; never another exception type, never a traceback."""

from __future__ import annotations

import dataclasses
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unipred.train.config import ConfigError, RunConfig, load_config, schema_for

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"


def _keys(cls, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{prefix}{f.name}.")
        elif t is not None and dataclasses.is_dataclass(t):
            out += _keys(t, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


KEYS = sorted(set(_keys(schema_for("image_pretrain")) + _keys(RunConfig)))
WORD = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=8)
NASTY = st.sampled_from(["", "null", "~", "[]", "{}", "[1, [2]]", "{a: 1}", "${nope}",
                         "${data.root}", "1e999", "-1", "nan", "inf", "true", "yes", "0x10",
                         "'quoted'", "\x00", "a" * 5000, "::", "=", "[", "{", "é", "1.5",
                         "2147483648", "-9223372036854775809"])  # fmt: skip
VALUE = st.one_of(NASTY, st.integers(-(10**20), 10**20).map(str), WORD,
                  st.text(max_size=20))  # fmt: skip
KEY = st.one_of(st.sampled_from(KEYS), st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(KEYS),
                                                 WORD), WORD)  # fmt: skip


def _check(call, keys: list[str]):
    try:
        call()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        assert "Traceback" not in msg
        assert any(k.split(".")[0] in msg for k in keys), (msg, keys)
    # any other exception type propagates and fails the test


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=KEY, value=VALUE)
def test_random_overrides(key, value):
    _check(lambda: load_config(TINY, [f"{key}={value}"], check_paths=True), [key])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(KEY, VALUE), min_size=1, max_size=3))
def test_random_yaml_files(pairs):
    from omegaconf import OmegaConf

    lines = []
    for key, value in pairs:
        parts = key.split(".")
        lines.append("\n".join(f"{'  ' * i}{p}:" for i, p in enumerate(parts[:-1]))
                     + ("\n" if len(parts) > 1 else "")
                     + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}")  # fmt: skip
    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text, encoding="utf-8")
        keys = [k for k, _ in pairs] + [str(p)]
        _check(lambda: load_config(p), keys)
    del OmegaConf


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200))
def test_random_yaml_text(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        _check(lambda: load_config(p), [str(p)])
