"""What run.json's and manifest.json's typed records share: keys a record does not name are kept
(``extra="allow"``), only the keys that were read or set are written back (so a file written
before a field existed reads and writes unchanged), and a file that is not one this version can
read is refused in one line naming the file and the field."""

from __future__ import annotations

from typing import Type, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict:
        """The record as its file holds it: the keys read or set, unknown ones included."""
        return self.model_dump(mode="json", exclude_unset=True)

    def recorded(self, name: str):
        """A field's value when the file (or the writer) gave it, else None."""
        return getattr(self, name) if name in self.model_fields_set else None

    @classmethod
    def validated(cls: Type[R], obj, source: str, refusal: Type[Exception], repair: str) -> R:
        """The record of a file's JSON ``obj``; ``refusal`` (one line: ``source``, the field,
        why, then ``repair``) when it is not one this version can read."""
        if not isinstance(obj, dict):
            raise refusal(f"{source}: the file: a JSON {type(obj).__name__}, not an object "
                          f"— {repair}")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            e = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in e["loc"]) or "the file"
            if e["type"] == "enum":  # "'a', 'b' or 'c'" -> a, b, c
                known = e["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
                why = f"{e['input']!r} is not one of {known}"
            else:
                why = e["msg"]
            raise refusal(f"{source}: {where}: {why} — {repair}") from None
