"""Which instance a caller sends to: own campus first, failing instances ejected with
back-off and probes, shielded campuses skipped, and instances that would refuse the call's
priority skipped (their last reported admission level).

Pure logic, no I/O and no clock: every method takes `now` (seconds, monotonic) from its
caller, so tables of events test it. It is written to be shared: the RPC stubs use it per
service, and the storage client can hold one per group (the instances are then a group's
replicas, `level` is never reported and stays ADMIT_ALL).

An instance's states, all transitions in this class:

    healthy    fewer than FAILURES_TO_EJECT consecutive failures: used in its campus's turn
    ejected    that many in a row: skipped until its back-off ends (EJECT_FIRST_S, doubling
               per failed probe up to EJECT_S_MAX)
    probing    the back-off ended and one call went to it: others skip it until that call
               answers or its attempt times out (the probe window)

A failure is a timeout, an Unavailable answer or an Overloaded answer (a success: anything
else, error answers included, since the instance is serving). Failures of calls sent before
the ejection are the same episode and change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvsvr.rpc.limits import (
    ADMIT_ALL,
    EJECT_DOUBLINGS_MAX,
    EJECT_FIRST_S,
    EJECT_S_MAX,
    FAILURES_TO_EJECT,
    LEVEL_CACHE_S,
    SAMPLE_EVERY,
)

# Why no instance was chosen.
SHIELDED = "shielded"
OVERLOADED = "overloaded"
EXHAUSTED = "exhausted"
SAMPLED = "sampled"       # chosen although its level refuses the call: a sample


def eject_s(probes_failed: int) -> float:
    """The back-off of an ejection after `probes_failed` failed probes (0: the first)."""
    return min(EJECT_S_MAX, EJECT_FIRST_S * 2.0 ** min(probes_failed, EJECT_DOUBLINGS_MAX))


class Instance:
    """A caller's view of one instance."""

    __slots__ = ("address", "campus", "failures", "level", "level_until", "probes_failed",
                 "probing", "until")

    def __init__(self, address: str, campus: str):
        self.address = address
        self.campus = campus
        self.failures = 0            # consecutive failures
        self.until = 0.0             # ejected (or probing) until then, if failures reached
        self.probing = False
        self.probes_failed = 0
        self.level = ADMIT_ALL       # the admission level it last reported ...
        self.level_until = 0.0       # ... honoured until then

    @property
    def ejected(self) -> bool:
        return self.failures >= FAILURES_TO_EJECT


class Failover:
    """Per-instance state of one caller for one service (see the module docstring)."""

    def __init__(self, instances: Sequence[tuple[str, str]], campus: str | None = None,
                 failures_to_eject: int = FAILURES_TO_EJECT):
        """`instances`: (address, campus) pairs; `campus`: the caller's own (its instances
        come first)."""
        if not instances:
            raise ValueError("instances: expected at least one (address, campus)")
        self.failures_to_eject = failures_to_eject
        self.instances = {address: Instance(address, where) for address, where in instances}
        own = [i for i in self.instances.values() if i.campus == campus]
        others = [i for i in self.instances.values() if i.campus != campus]
        self.tiers = [tier for tier in (own, others) if tier]
        self.turn = 0                # round robin inside a tier
        self.dropped = 0             # calls refused here for a reported level
        self.shielded: frozenset[str] = frozenset()

    def shield(self, campuses: frozenset[str]) -> None:
        """Send nothing to instances of `campuses` from now on (and to the others again)."""
        self.shielded = campuses

    def choose(self, now: float, priority: int = 0,
               exclude: Sequence[str] = ()) -> tuple[Instance | None, str]:
        """(instance, "") to send a call of `priority` to, or (None, why): SHIELDED (every
        instance not excluded is in a shielded campus), OVERLOADED (the rest reported a level
        that refuses `priority`) or EXHAUSTED (none left). One call in SAMPLE_EVERY that
        would be refused so is sent anyway: the answer is (instance, SAMPLED), and the call
        goes out flagged as a sample standing for that many. An ejected
        instance whose back-off ended is taken in its turn as the probe; when every
        candidate is ejected, the one whose back-off ends first is tried anyway (a call
        never refuses to try)."""
        self.turn += 1
        turn = self.turn
        shielded = self.shielded
        saw_overloaded = saw_shielded = False
        fallback: Instance | None = None
        refusing: Instance | None = None
        for tier in self.tiers:
            count = len(tier)
            for step in range(count):
                instance = tier[(turn + step) % count]
                if instance.address in exclude:
                    continue
                if instance.campus in shielded:
                    saw_shielded = True
                    continue
                if priority > instance.level and now < instance.level_until:
                    saw_overloaded = True
                    if refusing is None and instance.failures < self.failures_to_eject:
                        refusing = instance
                    continue
                if instance.failures >= self.failures_to_eject:
                    if now >= instance.until:
                        instance.probing = True
                        return instance, ""
                    if fallback is None or instance.until < fallback.until:
                        fallback = instance
                    continue
                return instance, ""
        if fallback is not None:
            return fallback, ""
        if saw_overloaded:
            self.dropped += 1
            if refusing is not None and self.dropped % SAMPLE_EVERY == 0:
                return refusing, SAMPLED
            return None, OVERLOADED
        if saw_shielded:
            return None, SHIELDED
        return None, EXHAUSTED

    def sent(self, instance: Instance, now: float, window_s: float) -> None:
        """A call went to `instance`; if it is its probe, others skip it for `window_s`."""
        if instance.probing and instance.failures >= self.failures_to_eject:
            instance.until = now + window_s

    def succeeded(self, address: str, now: float, level: int = ADMIT_ALL) -> None:
        """`address` answered (anything but Unavailable or Overloaded) reporting `level`."""
        instance = self.instances.get(address)
        if instance is None:
            return
        instance.failures = 0
        instance.probing = False
        instance.probes_failed = 0
        self._level(instance, now, level)

    def failed(self, address: str, now: float, level: int | None = None) -> None:
        """An attempt at `address` timed out or was refused (Overloaded reports `level`)."""
        instance = self.instances.get(address)
        if instance is None:
            return
        if level is not None:
            self._level(instance, now, level)
        if instance.failures < self.failures_to_eject:
            instance.failures += 1
            if instance.failures >= self.failures_to_eject:
                instance.until = now + eject_s(0)
        elif instance.probing:
            instance.probing = False
            instance.probes_failed += 1
            instance.until = now + eject_s(instance.probes_failed)
        # else: ejected already, and this call was sent before: the same episode

    @staticmethod
    def _level(instance: Instance, now: float, level: int) -> None:
        instance.level = level
        instance.level_until = now + LEVEL_CACHE_S if level < ADMIT_ALL else 0.0

    def state(self, address: str, now: float) -> str:
        instance = self.instances[address]
        if instance.campus in self.shielded:
            return "shielded"
        if instance.failures < self.failures_to_eject:
            return "healthy"
        return "probing" if instance.probing and now < instance.until else (
            "probe due" if now >= instance.until else "ejected")


__all__ = ["EXHAUSTED", "OVERLOADED", "SAMPLED", "SHIELDED", "Failover", "Instance", "eject_s"]
