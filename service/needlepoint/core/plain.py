"""Plain words for people: numbers, units, dates and ages as a coordinator reads them.

Rule messages and the coordinator's view of a decision are read by people who do not know UCUM
or internal codes. This module turns the machine forms into plain text, and nothing else: the
decision's JSON keeps the raw forms (``explanations[].matched`` shows ``3.4 {INR}`` and
``rxnorm#855332``), because auditors need them.

* :func:`human_unit`: a UCUM unit as it is written on a lab report (``10*9/L`` → ``×10⁹/L``,
  ``Cel`` → ``°C``, ``mL/min/{1.73_m2}`` → ``mL/min/1.73 m²``, ``{INR}`` → nothing: an INR is a
  ratio). Units it does not know keep their letters, with annotations and brackets removed.
* :func:`quantity`: a number with its human unit (``3.4``, ``25 ×10⁹/L``, ``38.5 °C``, ``7.2%``,
  ``1 day``, ``12 years``).
* :func:`day`, :func:`relative`: a date (``30 May 2025``) and how long before or after an
  instant it is (``3 days ago``, ``in 4 weeks``).
* :func:`units_in_text`: UCUM units inside free text (a data-issue detail) made human.
"""

from __future__ import annotations

import datetime as dt
import re

# UCUM units as a report prints them. An empty string: the value is a ratio and needs no unit.
_UNITS = {
    "{INR}": "",
    "{ratio}": "",
    "1": "",
    "10*9/L": "×10⁹/L",
    "10*3/uL": "×10³/µL",
    "10^3/uL": "×10³/µL",
    "10*3/mm3": "×10³/mm³",
    "K/uL": "×10³/µL",
    "/nL": "/nL",
    "Cel": "°C",
    "[degF]": "°F",
    "mL/min/{1.73_m2}": "mL/min/1.73 m²",
    "kg/m2": "kg/m²",
    "m[IU]/mL": "mIU/mL",
    "[IU]/L": "IU/L",
    "uL": "µL",
}

# Time units, written out (singular, plural).
_TIME_UNITS = {
    "d": ("day", "days"),
    "day": ("day", "days"),
    "days": ("day", "days"),
    "wk": ("week", "weeks"),
    "week": ("week", "weeks"),
    "weeks": ("week", "weeks"),
    "mo": ("month", "months"),
    "month": ("month", "months"),
    "months": ("month", "months"),
    "a": ("year", "years"),
    "year": ("year", "years"),
    "years": ("year", "years"),
    "h": ("hour", "hours"),
    "hours": ("hour", "hours"),
}

# Units written straight after the number, without a space.
_UNSPACED = ("%",)

_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def human_unit(unit: str | None) -> str:
    """``unit`` (UCUM, or already plain) as people write it; "" for none or a pure ratio."""
    if not unit:
        return ""
    if unit in _UNITS:
        return _UNITS[unit]
    text = re.sub(r"\{[^{}]*\}", "", unit)  # annotations carry no unit
    text = text.replace("[", "").replace("]", "")
    text = re.sub(r"10[*^](-?\d+)", lambda m: "×10" + m.group(1).translate(_SUPERSCRIPT), text)
    text = re.sub(r"(?<=[a-zA-Z])([23])\b", lambda m: m.group(1).translate(_SUPERSCRIPT), text)  # m2 -> m²
    return text.replace("uL", "µL").strip("/ ") if text.strip("/ ") else ""


def number(value: float | int) -> str:
    """A number as a report shows it: no exponent, no trailing zeros, two decimals at most below
    100 and one above (a converted glucose of 234.2088 reads 234.2)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    places = 2 if abs(value) < 100 else 1
    text = f"{round(value, places):.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def quantity(value: float | int, unit: str | None) -> str:
    """``value`` with ``unit`` in plain words: ``3.4``, ``25 ×10⁹/L``, ``7.2%``, ``1 day``."""
    shown = number(value)
    if unit in _TIME_UNITS:
        one, many = _TIME_UNITS[unit]
        return f"{shown} {one if shown == '1' else many}"
    words = human_unit(unit)
    if not words:
        return shown
    if words in _UNSPACED:
        return shown + words
    return f"{shown} {words}"


def day(instant: dt.datetime | dt.date | None) -> str:
    """The calendar day (UTC) of ``instant`` as ``30 May 2025``; "an unknown date" for None."""
    if instant is None:
        return "an unknown date"
    if isinstance(instant, dt.datetime):
        instant = instant.astimezone(dt.timezone.utc).date() if instant.tzinfo else instant.date()
    return f"{instant.day} {_MONTHS[instant.month - 1]} {instant.year}"


# English month names, as strftime's %B gives them in the C locale (a table: %B costs several µs
# a call, and would follow the process's locale into English sentences).
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def moment(instant: dt.datetime) -> str:
    """An instant as ``2 June 2025, 09:00 UTC``."""
    instant = instant.astimezone(dt.timezone.utc) if instant.tzinfo else instant
    return f"{day(instant)}, {instant:%H:%M} UTC"


def relative(instant: dt.datetime | None, now: dt.datetime) -> str:
    """How long before (``3 days ago``) or after (``in 4 weeks``) ``now`` the day of ``instant``
    is, counted in calendar days (UTC): today, yesterday/tomorrow, days up to two weeks, weeks up
    to two months, months up to two years, then years."""
    if instant is None:
        return "at an unknown time"
    days = (_utc_day(now) - _utc_day(instant)).days
    if days == 0:
        return "today"
    if days == 1:
        return "yesterday"
    if days == -1:
        return "tomorrow"
    span = _span(abs(days))
    return f"{span} ago" if days > 0 else f"in {span}"


def _span(days: int) -> str:
    """``days`` in the largest unit that still reads exactly enough."""
    if days < 14:
        count, unit = days, "day"
    elif days < 60:
        count, unit = days // 7, "week"
    elif days < 730:
        count, unit = int(days / 30.4375), "month"
    else:
        count, unit = int(days / 365.25), "year"
    return f"{count} {unit}{'' if count == 1 else 's'}"


def _utc_day(instant: dt.datetime) -> dt.date:
    return instant.astimezone(dt.timezone.utc).date() if instant.tzinfo else instant.date()


# The UCUM units that never read as words, for units_in_text: longest first, so that
# "mL/min/{1.73_m2}" is replaced before a shorter unit inside it could be.
_IN_TEXT = sorted((u for u in _UNITS if re.search(r"[{}\[\]*^]|^Cel$|^kg/m2$", u)), key=len, reverse=True)
_IN_TEXT_PATTERN = re.compile("|".join(rf"(?<![\w{{\[]){re.escape(u)}(?![\w}}\]])" for u in _IN_TEXT))
# Any of those units at all, whatever surrounds it: a cheap first look (under 1 µs where the
# pattern above takes 60 to 100 µs on a sentence without a unit), exact because the pattern
# cannot match a text in which none of its units occurs.
_IN_TEXT_ANY = re.compile("|".join(re.escape(u) for u in _IN_TEXT))


def units_in_text(text: str) -> str:
    """Free text with its UCUM units made human (``(mL/min/{1.73_m2})`` → ``(mL/min/1.73 m²)``);
    a ratio annotation such as ``{INR}`` becomes its name (``INR``) rather than vanishing."""

    def plain(match: re.Match) -> str:
        unit = match.group(0)
        return _UNITS[unit] or unit.strip("{}")

    if _IN_TEXT_ANY.search(text) is None:
        return text
    return _IN_TEXT_PATTERN.sub(plain, text)


def words(name: str) -> str:
    """An identifier (``FLUOROSCOPY``, ``greater-trochanteric-bursa``) as lower-case words."""
    return name.replace("_", " ").replace("-", " ").lower()


__all__ = ["human_unit", "number", "quantity", "day", "moment", "relative", "units_in_text", "words"]
