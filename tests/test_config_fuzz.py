"""Property: whatever text it is given, load_config returns a Config or raises a short ConfigError,
quickly and in bounded memory.

Generated inputs: random YAML documents (scalars of every type, huge and negative numbers, NaN,
long strings, binary), the same placed under the config's real keys so validation runs deep,
alias bombs, deep nesting, random token soup and random bytes.
"""

from __future__ import annotations

import resource
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharing.config import load_config
from sharing.config_models import Config
from sharing.errors import ConfigError
from sharing.yaml_text import LOADERS, parse_yaml

MESSAGE_LIMIT = 500
TIME_LIMIT_S = 1.0
MEMORY_LIMIT_KIB = 200 * 1024

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(min_size=3000, max_size=6000, alphabet="ab/.:"),
    st.binary(max_size=64),
    st.sampled_from(["all", "v1", "gpu", "nvidia.com/gpu", "mixed", "30s", "4G", "GPU-0", "0:1",
                     "/run/nvidia/../mps", "1e9", "-1", "0x10", ".inf", "~", "yes"]),
)
KEYS = ["version", "flags", "sharing", "timeSlicing", "mps", "resources", "name", "replicas",
        "devices", "rename", "migStrategy", "mpsRoot", "health", "ignoredXids", "plugin",
        "deviceListStrategy", "renameByDefault", "pinnedMemoryLimit", "probeInterval", "imex"]
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10), st.integers()),
                        children, max_size=6),
    ),
    max_leaves=40,
)


def _dump(value: object) -> str:
    return yaml.safe_dump(value, allow_unicode=True, width=10**6)


def config_shaped(value: object, replicas: object, devices: object) -> dict[str, object]:
    """A config whose real keys hold generated values, so field validators see them."""
    return {
        "version": "v1",
        "flags": {"migStrategy": value, "mpsRoot": value if isinstance(value, str) else "/m"},
        "sharing": {"timeSlicing": {"resources": [
            {"name": value if isinstance(value, str) else "gpu", "replicas": replicas,
             "devices": devices},
        ]}},
        "health": {"ignoredXids": [replicas], "probeInterval": value},
    }


@st.composite
def alias_bombs(draw: st.DrawFn) -> str:
    levels = draw(st.integers(2, 30))
    width = draw(st.integers(2, 12))
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    where = draw(st.sampled_from(["flags:\n  migStrategy:\n", "sharing:\n  timeSlicing:\n"
                                  "    resources:\n", "health:\n  ignoredXids:\n"]))
    indent = " " * (where.count("\n") * 2)
    body = "\n".join(indent + line for line in lines)
    use = f"\n{indent}use: *a{levels - 1}\n"
    return "version: v1\n" + where + body + use


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    depth = draw(st.integers(1, 5000))
    opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
    if opener == "- ":
        return "version: v1\nflags:\n" + "".join("  " * i + "- \n" for i in range(min(depth, 400)))
    return "version: v1\nflags:\n  migStrategy: " + opener * depth + "x" + closer * depth + "\n"


TOKENS = ["[", "]", "{", "}", "&a ", "*a", "&b ", "*b", ": ", "- ", "\n", "  ", "\t", "# c",
          "!!binary ", "!!python/object:os.system ", "<<: ", "? ", "'", '"', "0", "9" * 50, "x",
          "version: v1\n", "replicas: ", "---\n", "...\n", "%YAML 1.1\n", "|\n", ">\n", ",",
          "\x00", "\ufeff", "\udc80"]
token_soup = st.lists(st.sampled_from(TOKENS), max_size=200).map("".join)
random_bytes = st.binary(max_size=2000).map(lambda b: b.decode("utf-8", "surrogateescape"))
texts = st.one_of(
    values.map(_dump),
    st.builds(config_shaped, values, values, values).map(_dump),
    alias_bombs(),
    deep_nesting(),
    token_soup,
    random_bytes,
    st.text(max_size=300),
)


class PeakMemory:
    """Peak resident memory of this process during one input.

    On Linux the peak (VmHWM) is reset before each input through /proc/self/clear_refs, so the
    figure is that input's alone. Elsewhere the process's lifetime peak (ru_maxrss) is used:
    weaker (one figure for the run), never weaker than the property needs.
    """

    def __init__(self) -> None:
        self.resettable = self._reset()
        self.start_kib = self._rss_kib() if self.resettable else self._maxrss_kib()

    def begin(self) -> None:
        if self.resettable:
            self._reset()
            self.start_kib = self._rss_kib()

    def grown_kib(self) -> int:
        if self.resettable:
            return self._status("VmHWM") - self.start_kib
        return self._maxrss_kib() - self.start_kib

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise LookupError(field)

    def _rss_kib(self) -> int:
        return self._status("VmRSS")

    @staticmethod
    def _maxrss_kib() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def check_one(text: str, loader: str, memory: PeakMemory) -> None:
    """The property for one input."""
    memory.begin()
    started = time.monotonic()
    try:
        if loader == "default":
            result = load_config(text, source="fuzz.yaml")
        else:
            parse_yaml(text, loader=loader)
            result = None
    except ConfigError as err:
        message = str(err)
        assert message.startswith("fuzz.yaml: "), message
        assert len(message) < MESSAGE_LIMIT, message
    except (yaml.YAMLError, ValueError):
        assert loader != "default", "load_config let a parse error through"
    else:
        assert result is None or isinstance(result, Config)
    took = time.monotonic() - started
    assert took < TIME_LIMIT_S, f"{took:.2f}s for {text[:200]!r}"
    grown = memory.grown_kib()
    assert grown < MEMORY_LIMIT_KIB, f"{grown} KiB for {text[:200]!r}"


@pytest.fixture(scope="module")
def memory() -> PeakMemory:
    """Peak memory measurement for the generated inputs."""
    return PeakMemory()


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=texts)
def test_load_returns_a_config_or_a_short_config_error(memory: PeakMemory, text: str) -> None:
    """load_config: a Config, or a ConfigError under 500 characters; < 1 s and 200 MiB each."""
    check_one(text, "default", memory)


@pytest.mark.parametrize("loader", list(LOADERS))
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_each_parser_is_bounded(memory: PeakMemory, loader: str, text: str) -> None:
    """Each YAML parser on its own: a value or a YAML/limit error, never anything else."""
    check_one(text, loader, memory)
