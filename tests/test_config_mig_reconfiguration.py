"""The migReconfiguration config section: defaults, durations, schedule, strict errors."""

from __future__ import annotations

import pytest

from sharing.config import ConfigError, load_config

BASE = "version: v1\n"


def test_defaults_without_the_section() -> None:
    """No section: no file, no schedule, a 300 s drain timeout, processes never killed."""
    section = load_config(BASE).mig_reconfiguration
    assert (section.config_file, section.schedule) == (None, ())
    assert (section.drain_timeout_s, section.kill_processes) == (300.0, False)


def test_full_section() -> None:
    """Every key read; the duration is converted to seconds, cron kept as written."""
    section = load_config(BASE + """\
migReconfiguration:
  configFile: /etc/gpushare/mig.yaml
  schedule:
    - {cron: "0 2 * * 1-5", config: all-1g.5gb}
    - {cron: "0 8 * * 1-5", config: all-disabled}
  drainTimeout: 2m30s
  killProcesses: true
""").mig_reconfiguration
    assert section.config_file == "/etc/gpushare/mig.yaml"
    assert [(e.cron, e.config) for e in section.schedule] == [
        ("0 2 * * 1-5", "all-1g.5gb"), ("0 8 * * 1-5", "all-disabled")
    ]
    assert (section.drain_timeout_s, section.kill_processes) == (150.0, True)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        pytest.param("{configFile: m.yaml, schedule: [{cron: '0 2 * *', config: a}]}",
                     "c.yaml: migReconfiguration.schedule[0].cron: \"0 2 * *\" has 4 fields",
                     id="cron with 4 fields"),
        pytest.param("{configFile: m.yaml, schedule: [{cron: '0 2 * * 9', config: a}]}",
                     "migReconfiguration.schedule[0].cron: \"0 2 * * 9\" is not a valid cron",
                     id="day of week out of range"),
        pytest.param("{schedule: [{cron: '0 2 * * *', config: a}]}",
                     "c.yaml: migReconfiguration: schedule needs configFile",
                     id="schedule without configFile"),
        pytest.param("{configFile: m.yaml, schedule: [{cron: '0 2 * * *'}]}",
                     "migReconfiguration.schedule[0].config: required, but missing",
                     id="entry without config"),
        pytest.param("{configFile: m.yaml, schedule: [{cron: '0 2 * * *', config: 'a b'}]}",
                     "schedule[0].config: must be a mig-parted config name",
                     id="config name with a space"),
        pytest.param("{drainTimeout: soon}",
                     "migReconfiguration.drainTimeout: must be a duration", id="bad duration"),
        pytest.param("{drainTimeout: 2d}",
                     "migReconfiguration.drainTimeout: must be a duration", id="unknown unit"),
        pytest.param("{drainTimeout: 100000}",
                     "migReconfiguration.drainTimeout: must be <= 86400", id="over a day"),
        pytest.param("{killProcesses: yes please}",
                     "migReconfiguration.killProcesses: must be true or false", id="not a bool"),
        pytest.param("{killProcess: true}",
                     "migReconfiguration.killProcess: unknown key; did you mean "
                     "migReconfiguration.killProcesses?", id="misspelt key"),
        pytest.param("{configFile: m.yaml, schedule: [{cron: '0 2 * * *', config: a}, "
                     "{cron: '0 3 * * *', config: b}, {cron: ' 0  2 * * * ', config: c}]}",
                     'migReconfiguration: schedule[2] fires at the same times as schedule[0] '
                     '("0 2 * * *"): only one job runs at a time, so one of them would be '
                     "skipped; keep one entry per time", id="two entries at the same time"),
        pytest.param("{configFile: m.yaml, schedule: [{cron: '0 2 * * *', config: a, at: 1}]}",
                     "migReconfiguration.schedule[0].at: unknown key", id="unknown entry key"),
    ],
)
def test_errors_name_file_and_field(section: str, message: str) -> None:
    """Each invalid section is one error naming the file and the field path."""
    with pytest.raises(ConfigError) as caught:
        load_config(BASE + f"migReconfiguration: {section}\n", source="c.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("c.yaml: migReconfiguration")
