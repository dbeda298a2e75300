"""
The record format: canonical JSON, the fields every record carries, names,
and the hybrid logical clock that makes versions.
"""

import hashlib
import json
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from minstore.errors import BadRequest
from minstore.records import (
    MAX_UID_BYTES,
    HybridLogicalClock,
    canonical_json,
    check_collection,
    check_uid,
    decode_record,
    encode_record,
    make_record,
    make_tombstone,
    version_timestamp,
)

VERSION_RE = re.compile(r"\A\d{13}-\d{6}-[0-9a-z]+\Z")


class FakeTime:
    """A wall clock the test sets by hand, in seconds."""

    def __init__(self, seconds=1_700_000_000.0):
        self.seconds = seconds

    def __call__(self):
        return self.seconds


class CanonicalJSONTests(SynchronousTestCase):
    def test_exact_bytes(self):
        """Keys are sorted at every depth and no space follows a separator."""
        self.assertEqual(
            canonical_json({"b": 1, "a": [1, 2, {"d": None, "c": True}], "e": "x y"}),
            b'{"a":[1,2,{"c":true,"d":null}],"b":1,"e":"x y"}',
        )

    def test_non_ascii_not_escaped(self):
        """Non-ASCII characters are written as UTF-8, not as \\u escapes."""
        self.assertEqual(
            canonical_json({"t": "caf\u00e9 \u65e5\u672c \U0001f600"}),
            '{"t":"caf\u00e9 \u65e5\u672c \U0001f600"}'.encode("utf-8"),
        )

    def test_scalars(self):
        """Every JSON type has one canonical form."""
        self.assertEqual(canonical_json(None), b"null")
        self.assertEqual(canonical_json(12), b"12")
        self.assertEqual(canonical_json(1.5), b"1.5")
        self.assertEqual(canonical_json("a\"b\\c\n"), b'"a\\"b\\\\c\\n"')
        self.assertEqual(canonical_json([]), b"[]")
        self.assertEqual(canonical_json({}), b"{}")

    def test_matches_design_formula(self):
        """canonical_json is the formula of DESIGN section 2, byte for byte."""
        value = {"z": {"y": [3, "\u00fc"], "x": 0.25}, "A": False}
        self.assertEqual(
            canonical_json(value),
            json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(),
        )

    def test_nan_refused(self):
        """NaN and infinities are not JSON and are refused."""
        self.assertRaises(ValueError, canonical_json, float("nan"))
        self.assertRaises(ValueError, canonical_json, {"x": float("inf")})


class MakeRecordTests(SynchronousTestCase):
    def test_fields(self):
        """A record carries uid, collection, value, version, timestamp, check_sum and size."""
        value = {"title": "L'\u00e9tranger", "year": 1942}
        record = make_record("books", "b1", value, "0000000000001-000000-n", 12.5)
        body = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        self.assertEqual(
            record,
            {
                "uid": "b1",
                "collection": "books",
                "value": value,
                "version": "0000000000001-000000-n",
                "timestamp": 12.5,
                "check_sum": hashlib.sha256(body).hexdigest(),
                "size": len(body),
            },
        )

    def test_size_counts_bytes_not_characters(self):
        """size is the byte length of the canonical JSON, so non-ASCII counts several."""
        record = make_record("c", "u", "\u00e9\u00e9", "v", 0.0)
        self.assertEqual(record["size"], 6)  # two quotes and two 2-byte characters
        self.assertEqual(record["check_sum"], hashlib.sha256('"\u00e9\u00e9"'.encode("utf-8")).hexdigest())

    def test_check_sum_of_each_json_type(self):
        """check_sum and size follow the canonical JSON of any JSON value."""
        for value in [None, 0, -3.25, True, "", "text", [1, "a"], {"b": {"a": 1}}]:
            record = make_record("c", "u", value, "v", 0.0)
            body = canonical_json(value)
            self.assertEqual(record["check_sum"], hashlib.sha256(body).hexdigest())
            self.assertEqual(record["size"], len(body))

    def test_key_order_does_not_change_check_sum(self):
        """Two objects with the same members in another order have one check_sum."""
        a = make_record("c", "u", {"a": 1, "b": 2}, "v", 0.0)
        b = make_record("c", "u", {"b": 2, "a": 1}, "v", 0.0)
        self.assertEqual(a["check_sum"], b["check_sum"])

    def test_tombstone(self):
        """A tombstone has no value and is flagged deleted."""
        self.assertEqual(
            make_tombstone("c", "u", "v1", 3.0),
            {"uid": "u", "collection": "c", "version": "v1", "timestamp": 3.0, "deleted": True},
        )

    def test_encode_decode(self):
        """A record is stored as its canonical JSON and decodes to itself."""
        record = make_record("c", "\u00e9", [1, {"b": 2, "a": 1}], "v", 1.0)
        data = encode_record(record)
        self.assertEqual(data, canonical_json(record))
        self.assertEqual(decode_record(data), record)


class NameTests(SynchronousTestCase):
    def test_good_collections(self):
        """Names of 1 to 64 characters from [A-Za-z0-9_.-], not starting with _ . -, are collections."""
        for name in ["a", "Z", "0", "books", "b.o-o_k", "a" * 64, "9_"]:
            self.assertEqual(check_collection(name), name)

    def test_bad_collections(self):
        """Other names are refused with bad_collection."""
        for name in ["", "_x", ".x", "-x", "a b", "a/b", "a" * 65, "caf\u00e9", "a\n", None, 3]:
            e = self.assertRaises(BadRequest, check_collection, name)
            self.assertEqual(e.error, "bad_collection")
            self.assertEqual(e.code, 400)

    def test_good_uids(self):
        """Any non-empty string up to 255 bytes of UTF-8 is a uid."""
        for uid in ["a", " ", "../x", "a" * 255, "\u20ac" * 85, "%2F"]:
            self.assertEqual(check_uid(uid), uid)

    def test_bad_uids(self):
        """Empty, too long (in bytes) or non-UTF-8 uids are refused with bad_uid."""
        self.assertEqual(MAX_UID_BYTES, 255)
        for uid in ["", "a" * 256, "\u20ac" * 85 + "a", "\ud800", None]:
            e = self.assertRaises(BadRequest, check_uid, uid)
            self.assertEqual(e.error, "bad_uid")


class HybridLogicalClockTests(SynchronousTestCase):
    def test_format(self):
        """A version is 13 digits of milliseconds, 6 of counter, and the node id."""
        time = FakeTime(1_700_000_000.125)
        clock = HybridLogicalClock("node1", now=time)
        version = clock.now()
        self.assertEqual(version, "1700000000125-000000-node1")
        self.assertRegex(version, VERSION_RE)
        self.assertEqual(version_timestamp(version), 1_700_000_000.125)

    def test_versions_increase_with_time(self):
        """Versions made as the wall clock advances strictly increase."""
        time = FakeTime()
        clock = HybridLogicalClock("n", now=time)
        versions = []
        for _ in range(50):
            versions.append(clock.now())
            time.seconds += 0.0007
        self.assertEqual(sorted(set(versions)), versions)

    def test_frozen_clock(self):
        """With a wall clock that does not move, versions still strictly increase."""
        clock = HybridLogicalClock("n", now=FakeTime())
        versions = [clock.now() for _ in range(1000)]
        self.assertEqual(sorted(set(versions)), versions)
        self.assertEqual(versions[-1], "1700000000000-000999-n")

    def test_backwards_clock(self):
        """When the wall clock steps back, versions still strictly increase."""
        time = FakeTime()
        clock = HybridLogicalClock("n", now=time)
        versions = []
        for step in [0, 5, -10, -3600, 1, -0.001, 0, 7200]:
            time.seconds += step
            versions.append(clock.now())
            versions.append(clock.now())
        self.assertEqual(sorted(set(versions)), versions)

    def test_counter_overflow_keeps_order(self):
        """
        However many versions share one millisecond (a frozen or stepped-back
        wall clock), a later version still compares greater as a string.
        """
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        wall_ms = int(time.seconds * 1000)
        last = "%013d-999999-b" % (wall_ms,)
        clock.observe(last)
        versions = [clock.now() for _ in range(3)]
        self.assertGreater(versions[0], last)
        self.assertEqual(sorted(set(versions)), versions)
        for version in versions:
            self.assertRegex(version, VERSION_RE)

    def test_observe_newer_version(self):
        """After observing a newer version from another node, the next version is greater."""
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        mine = clock.now()
        theirs = "%013d-000042-b" % (int(time.seconds * 1000) + 30_000)
        clock.observe(theirs)
        after = clock.now()
        self.assertGreater(after, theirs)
        self.assertGreater(after, mine)
        self.assertTrue(after.startswith(theirs[:13] + "-000043-"), after)

    def test_observe_same_millisecond_higher_counter(self):
        """A version of the same millisecond with a higher counter is folded in too."""
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        clock.now()
        theirs = "%013d-000500-b" % (int(time.seconds * 1000),)
        clock.observe(theirs)
        self.assertGreater(clock.now(), theirs)

    def test_observe_older_version(self):
        """Observing an older version changes nothing: the next version follows the wall clock."""
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        clock.observe("0000000000001-000001-b")
        self.assertEqual(clock.now(), "%013d-000000-a" % (int(time.seconds * 1000),))

    def test_observe_garbage(self):
        """Versions that do not parse are ignored."""
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        for garbage in ["", "x", "12-ab-c", None, "9999999999999999"]:
            clock.observe(garbage)
        self.assertEqual(clock.now(), "%013d-000000-a" % (int(time.seconds * 1000),))

    def test_version_beyond_drift_not_folded(self):
        """
        A version more than MAX_DRIFT_MS ahead of the wall clock is not
        folded in: one node with a wild clock does not drag the others.
        """
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        wall_ms = int(time.seconds * 1000)
        wild = "%013d-000000-b" % (wall_ms + HybridLogicalClock.MAX_DRIFT_MS + 1)
        clock.observe(wild)
        after = clock.now()
        self.assertLess(after, wild)
        self.assertEqual(after, "%013d-000000-a" % (wall_ms,))

    def test_version_at_drift_limit_folded(self):
        """A version exactly MAX_DRIFT_MS ahead is still folded in."""
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        wall_ms = int(time.seconds * 1000)
        edge = "%013d-000000-b" % (wall_ms + HybridLogicalClock.MAX_DRIFT_MS)
        clock.observe(edge)
        self.assertGreater(clock.now(), edge)

    def test_resume_continues_after_the_highest_version_held(self):
        """
        After a restart (a new clock given the highest version held) versions
        sort after every version issued before, even when the wall clock went
        back in time in between.
        """
        time = FakeTime()
        first = HybridLogicalClock("a", now=time)
        issued = [first.now() for _ in range(5)]
        time.seconds -= 3600
        second = HybridLogicalClock("a", now=time)
        second.resume(max(issued))
        later = [second.now() for _ in range(5)]
        self.assertGreater(later[0], max(issued))
        self.assertEqual(sorted(set(later)), later)

    def test_resume_never_runs_ahead_of_the_wall_clock(self):
        """
        Resumed from a version older than the wall clock, the next version is
        the wall clock's millisecond: no reservation carries it further ahead.
        """
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        clock.resume("%013d-000042-a" % (int(time.seconds * 1000) - 5000))
        self.assertEqual(clock.now(), "%013d-000000-a" % int(time.seconds * 1000))

    def test_resume_from_a_frozen_millisecond(self):
        """Restarting twice within one frozen millisecond still gives increasing versions."""
        time = FakeTime()
        versions = []
        for _ in range(3):
            clock = HybridLogicalClock("a", now=time)
            if versions:
                clock.resume(versions[-1])
            versions.extend(clock.now() for _ in range(3))
        self.assertEqual(sorted(set(versions)), versions)

    def test_resume_ignores_a_foreign_string(self):
        """A held version that is not one of ours (damaged) does not move the clock."""
        time = FakeTime()
        clock = HybridLogicalClock("a", now=time)
        clock.resume("not-a-version")
        self.assertEqual(clock.now(), "%013d-000000-a" % int(time.seconds * 1000))
