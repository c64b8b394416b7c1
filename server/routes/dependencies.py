"""`Injected[...]`: how a route names a dependency the app provides (see server.app.create_app)."""

from __future__ import annotations

from typing import Annotated, TypeAlias, TypeVar

from litestar.di import Dependency
from litestar.params import SkipValidationMarker

T = TypeVar("T")

# A dependency the app provides by this parameter's name. Not validated: these are the server's
# own objects (Litestar would otherwise try to msgspec-convert a Database or an engine).
Injected: TypeAlias = Annotated[T, Dependency(kind="named"), SkipValidationMarker()]
