"""FHIR R4 adapters: a Bundle or a CDS Hooks request in, a :class:`PatientRecord` out."""

from needlepoint.fhir.mapper import record_from_bundle, record_from_cds_hooks_request

__all__ = ["record_from_bundle", "record_from_cds_hooks_request"]
