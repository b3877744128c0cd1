"""State sections: the one serialization of VM state shared by checkpoint files and migration.

A section is ``(name, version, payload)``: a kernel struct, a vCPU or a device, as its
``save()`` produced it. Payloads are self-describing (canonical JSON, bytes tagged), so fields can
be added without breaking old readers; a reader refuses a section it cannot understand, naming
it. ``snapshot`` writes sections to ``FILE.kern`` and ``migration`` sends them; neither knows the
other, both speak through here.
"""

from .section import (
    Section,
    SectionError,
    SectionRecord,
    SectionRegistry,
    decode_payload,
    decode_sections,
    encode_container,
    encode_payload,
    encode_sections,
    read_container,
    section_checksum,
)

__all__ = [
    "Section",
    "SectionError",
    "SectionRecord",
    "SectionRegistry",
    "decode_payload",
    "decode_sections",
    "encode_container",
    "encode_payload",
    "encode_sections",
    "read_container",
    "section_checksum",
]
