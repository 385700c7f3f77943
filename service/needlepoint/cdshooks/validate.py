"""A checker for CDS Hooks 2.0 documents: discovery, service response and feedback.

The spec's logical models (``HL7/cds-hooks`` ``input/fsh``) and its JSON rules are encoded here as
code, so that tests check every response this service sends rather than a reader eyeballing
them. Each function returns a list of problems, ``path: message``; an empty list means valid.

What is checked:

* required fields and their JSON types, and the closed vocabularies (indicator, selectionBehavior,
  action type, link type, feedback outcome);
* the JSON rule that an element is never ``null``, ``""``, ``[]`` or ``{}`` (an optional element
  without a value is omitted), except ``cards: []``;
* ``summary`` under 140 characters; with ``strict=True`` also a ``uuid`` on every card and
  suggestion (this service always sends them: the spec makes them the keys of feedback);
* the invariants: cds-resp-1 (``at-most-one`` allows at most one ``isRecommended`` suggestion),
  cds-resp-2 (a ``delete`` has ``resourceId`` and no ``resource``; create and update carry a
  resource), cds-resp-3 (``appContext`` only on ``smart`` links), cds-resp-4 (every
  ``overrideReasons`` Coding has ``display``; every Coding has ``system`` and ``code``), cds-resp-5
  (every action has a ``description``), cds-resp-6 (suggestions need ``selectionBehavior``),
  cds-resp-7 (``actionSelectionBehavior`` is all, any or at-most-one); cds-fb-1 (outcome accepted or
  overridden), cds-fb-2 (accepted needs ``acceptedSuggestions``), cds-fb-3 (an ``overrideReason``
  has a ``reason`` or a ``userComment``);
* ``extension`` is an object whose keys are reverse-domain names.

Also usable from the shell: ``needlepoint cds validate FILE`` guesses the kind of document from
its top-level keys.
"""

from __future__ import annotations

import re
from typing import Any

INDICATORS = ("info", "warning", "critical")
SELECTION_BEHAVIORS = ("at-most-one", "any")
ACTION_SELECTION_BEHAVIORS = ("all", "any", "at-most-one")
ACTION_TYPES = ("create", "update", "delete")
LINK_TYPES = ("absolute", "smart")
FEEDBACK_OUTCOMES = ("accepted", "overridden")
MAX_SUMMARY = 140  # "<140-character summary"

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_RELATIVE_REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_REVERSE_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


class _Checker:
    """Collects problems while walking one document."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def no_empties(self, node: Any, path: str, allowed_empty: frozenset[str] = frozenset()) -> None:
        """No null, "", [] or {} anywhere below ``node`` (FHIR resources included), except at the
        paths in ``allowed_empty``."""
        if node is None:
            self.add(path, "null is not allowed; omit the element")
        elif node in ("", [], {}):
            if path not in allowed_empty:
                self.add(path, f"an empty {type(node).__name__} is not allowed; omit the element")
        elif isinstance(node, dict):
            for key, value in node.items():
                self.no_empties(value, f"{path}.{key}", allowed_empty)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                self.no_empties(value, f"{path}[{i}]", allowed_empty)

    def field(self, obj: dict, key: str, path: str, kind: type | tuple[type, ...], *, required: bool) -> Any:
        """``obj[key]`` if present and of ``kind``; a problem if required and absent or mistyped."""
        if key not in obj:
            if required:
                self.add(f"{path}.{key}", "required")
            return None
        value = obj[key]
        if value is None:
            return None  # reported by no_empties
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.add(f"{path}.{key}", f"expected {names}, found {type(value).__name__}")
            return None
        return value

    def one_of(self, obj: dict, key: str, path: str, allowed: tuple[str, ...], *, required: bool) -> str | None:
        value = self.field(obj, key, path, str, required=required)
        if value is not None and value not in allowed:
            self.add(f"{path}.{key}", f"{value!r} is not one of {', '.join(allowed)}")
            return None
        return value

    def coding(self, obj: Any, path: str, *, display_required: bool) -> None:
        if not isinstance(obj, dict):
            self.add(path, "a Coding must be an object")
            return
        self.field(obj, "system", path, str, required=True)
        self.field(obj, "code", path, str, required=True)
        self.field(obj, "display", path, str, required=display_required)

    def extension(self, obj: dict, path: str) -> None:
        ext = self.field(obj, "extension", path, dict, required=False)
        for key in ext or {}:
            if not _REVERSE_DOMAIN.match(key):
                self.add(f"{path}.extension.{key}", "extension keys are reverse-domain names (e.g. com.example.thing)")

    def objects(self, obj: dict, key: str, path: str, *, required: bool = False) -> list[tuple[str, dict]]:
        """The objects of a list field, with their paths; non-objects are reported."""
        items = self.field(obj, key, path, list, required=required) or []
        found = []
        for i, item in enumerate(items):
            where = f"{path}.{key}[{i}]"
            if isinstance(item, dict):
                found.append((where, item))
            else:
                self.add(where, f"expected an object, found {type(item).__name__}")
        return found


# --- responses ----------------------------------------------------------------------------------


def validate_response(doc: Any, *, strict: bool = False) -> list[str]:
    """Problems with a CDS Service response (``{"cards": [...], "systemActions": [...]}``);
    ``strict`` also requires the card and suggestion uuids that feedback needs."""
    check = _Checker()
    if not isinstance(doc, dict):
        return ["$: a response must be a JSON object"]
    check.no_empties(doc, "$", allowed_empty=frozenset({"$.cards"}))
    check.field(doc, "cards", "$", list, required=True)
    for path, card in check.objects(doc, "cards", "$"):
        _card(check, card, path, strict)
    for path, action in check.objects(doc, "systemActions", "$"):
        _action(check, action, path)
    check.extension(doc, "$")
    return check.problems


def _card(check: _Checker, card: dict, path: str, strict: bool) -> None:
    uuid = check.field(card, "uuid", path, str, required=strict)
    if uuid is not None and not _UUID.match(uuid):
        check.add(f"{path}.uuid", f"{uuid!r} is not a UUID")
    summary = check.field(card, "summary", path, str, required=True)
    if summary is not None and len(summary) >= MAX_SUMMARY:
        check.add(f"{path}.summary", f"{len(summary)} characters; the summary must be under {MAX_SUMMARY}")
    check.field(card, "detail", path, str, required=False)
    check.one_of(card, "indicator", path, INDICATORS, required=True)
    source = check.field(card, "source", path, dict, required=True)
    if source is not None:
        where = f"{path}.source"
        check.field(source, "label", where, str, required=True)
        check.field(source, "url", where, str, required=False)
        check.field(source, "icon", where, str, required=False)
        if check.field(source, "topic", where, dict, required=False) is not None:
            check.coding(source["topic"], f"{where}.topic", display_required=False)
    suggestions = check.objects(card, "suggestions", path)
    behavior = check.one_of(card, "selectionBehavior", path, SELECTION_BEHAVIORS, required=False)
    if suggestions and "selectionBehavior" not in card:
        check.add(f"{path}.selectionBehavior", "cds-resp-6: required when suggestions are present")
    if behavior == "at-most-one" and sum(1 for _, s in suggestions if s.get("isRecommended") is True) > 1:
        check.add(f"{path}.suggestions", "cds-resp-1: at-most-one allows at most one isRecommended suggestion")
    for where, suggestion in suggestions:
        check.field(suggestion, "label", where, str, required=True)
        sid = check.field(suggestion, "uuid", where, str, required=strict)
        if sid is not None and not _UUID.match(sid):
            check.add(f"{where}.uuid", f"{sid!r} is not a UUID")
        check.field(suggestion, "isRecommended", where, bool, required=False)
        check.one_of(suggestion, "actionSelectionBehavior", where, ACTION_SELECTION_BEHAVIORS, required=False)
        for apath, action in check.objects(suggestion, "actions", where):
            _action(check, action, apath)
    for where, reason in check.objects(card, "overrideReasons", path):
        check.coding(reason, where, display_required=True)  # cds-resp-4
    for where, link in check.objects(card, "links", path):
        check.field(link, "label", where, str, required=True)
        check.field(link, "url", where, str, required=True)
        kind = check.one_of(link, "type", where, LINK_TYPES, required=True)
        if "appContext" in link and kind != "smart":
            check.add(f"{where}.appContext", "cds-resp-3: appContext is only allowed on smart links")
        check.field(link, "autolaunchable", where, bool, required=False)
    check.extension(card, path)


def _action(check: _Checker, action: dict, path: str) -> None:
    kind = check.one_of(action, "type", path, ACTION_TYPES, required=True)
    check.field(action, "description", path, str, required=True)  # cds-resp-5
    resource = check.field(action, "resource", path, dict, required=False)
    resource_id = check.field(action, "resourceId", path, str, required=False)
    if kind == "delete":
        if resource_id is None:
            check.add(f"{path}.resourceId", "cds-resp-2: a delete names the resource in resourceId")
        if "resource" in action:
            check.add(f"{path}.resource", "cds-resp-2: a delete carries no resource")
    elif kind in ("create", "update"):
        if resource is None:
            check.add(f"{path}.resource", f"a {kind} carries the whole resource")
        elif not isinstance(resource.get("resourceType"), str):
            check.add(f"{path}.resource.resourceType", "required")
        elif kind == "update" and not isinstance(resource.get("id"), str):
            check.add(f"{path}.resource.id", "an update names the resource it replaces by id")
    if resource_id is not None and not _RELATIVE_REFERENCE.match(resource_id):
        check.add(f"{path}.resourceId", f"{resource_id!r} is not a relative reference (Type/id)")


# --- discovery ----------------------------------------------------------------------------------


def validate_discovery(doc: Any) -> list[str]:
    """Problems with a discovery response (``{"services": [...]}``)."""
    check = _Checker()
    if not isinstance(doc, dict):
        return ["$: a discovery document must be a JSON object"]
    check.no_empties(doc, "$", allowed_empty=frozenset({"$.services"}))
    check.field(doc, "services", "$", list, required=True)
    seen: set[tuple[str, str]] = set()
    for path, service in check.objects(doc, "services", "$"):
        hook = check.field(service, "hook", path, str, required=True)
        sid = check.field(service, "id", path, str, required=True)
        check.field(service, "title", path, str, required=False)
        check.field(service, "description", path, str, required=True)
        check.field(service, "usageRequirements", path, str, required=False)
        prefetch = check.field(service, "prefetch", path, dict, required=False)
        for key, template in (prefetch or {}).items():
            if not isinstance(template, str):
                check.add(f"{path}.prefetch.{key}", "a prefetch template is a string")
            elif "{{context.draftOrders" in template or "{{context.selections" in template:
                check.add(f"{path}.prefetch.{key}", "only first-level primitive context fields may be tokens")
        if (hook, sid) in seen:
            check.add(path, f"service {sid!r} is listed twice for hook {hook!r}")
        seen.add((hook, sid))
        check.extension(service, path)
    return check.problems


# --- feedback -----------------------------------------------------------------------------------


def validate_feedback(doc: Any) -> list[str]:
    """Problems with a feedback request body (``{"feedback": [...]}``)."""
    check = _Checker()
    if not isinstance(doc, dict):
        return ["$: a feedback request must be a JSON object"]
    check.no_empties(doc, "$")
    check.field(doc, "feedback", "$", list, required=True)
    for path, item in check.objects(doc, "feedback", "$"):
        check.field(item, "card", path, str, required=True)
        outcome = check.one_of(item, "outcome", path, FEEDBACK_OUTCOMES, required=True)  # cds-fb-1
        stamp = check.field(item, "outcomeTimestamp", path, str, required=True)
        if stamp is not None and not _INSTANT.match(stamp):
            check.add(f"{path}.outcomeTimestamp", f"{stamp!r} is not an instant with a time zone (e.g. 2021-12-11T10:05:31Z)")
        accepted = check.objects(item, "acceptedSuggestions", path)
        if outcome == "accepted" and not accepted:
            check.add(f"{path}.acceptedSuggestions", "cds-fb-2: required when the outcome is accepted")
        for where, suggestion in accepted:
            check.field(suggestion, "id", where, str, required=True)
        reason = check.field(item, "overrideReason", path, dict, required=False)
        if reason is not None:
            where = f"{path}.overrideReason"
            if check.field(reason, "reason", where, dict, required=False) is not None:
                check.coding(reason["reason"], f"{where}.reason", display_required=False)
            check.field(reason, "userComment", where, str, required=False)
            if "reason" not in reason and "userComment" not in reason:
                check.add(where, "cds-fb-3: an overrideReason needs a reason or a userComment")
        if outcome == "accepted" and reason is not None:
            check.add(f"{path}.overrideReason", "an accepted card has no override reason")
        check.extension(item, path)
    return check.problems


def validate_document(doc: Any) -> tuple[str, list[str]]:
    """Guess what ``doc`` is from its top-level keys, and check it: (kind, problems)."""
    if isinstance(doc, dict) and "services" in doc:
        return "discovery", validate_discovery(doc)
    if isinstance(doc, dict) and "feedback" in doc:
        return "feedback", validate_feedback(doc)
    return "response", validate_response(doc)
