"""State sections: the one serialization of VM state shared by checkpoint files and migration.

A section is ``(name, version, payload)``: a kernel struct, the vCPUs or a device. ``persist``
is the one save/restore pattern: each piece of state declares its fields, ``VERSION``,
``MIN_VERSION`` and defaults for later fields once, and that declaration turns it into a payload
and reads a payload back at the section's version. ``section`` owns the encoding (canonical
JSON, bytes tagged) and the container; ``kernel`` the list of kernel sections and the machine's
sections in order. A reader refuses a section it cannot understand, naming it. ``snapshot``
writes sections to ``FILE.kern`` and ``migration`` sends them; neither knows the other, both
speak through here.
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
