"""A ``requests`` transport adapter whose TLS is the hardened context:
``session.mount("https://", HardenedAdapter(policy))``, for applications that already
speak HTTPS with ``requests``. It runs on urllib3 (what ``requests`` runs on); the class
is built on first use, so importing :mod:`iothub_tls.https` imports neither.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from ..auth import ClientIdentity
from ..errors import MissingDependencyError, PolicyError
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context

if TYPE_CHECKING:
    from requests import PreparedRequest, Response
    from requests.adapters import HTTPAdapter

__all__ = ["HardenedAdapter"]

logger = logging.getLogger("iothub_tls.https")


# -- requests -----------------------------------------------------------------------------

if TYPE_CHECKING:

    class HardenedAdapter(HTTPAdapter):
        """A ``requests`` transport adapter whose TLS is a :class:`HardenedSSLContext`:
        ``session.mount("https://", HardenedAdapter(policy, identity=identity))``.

        Certificate verification stays required and requests' CA bundle stays away, so
        the trust anchors are exactly the policy's roots; ``verify=False``, a ``verify``
        path and ``cert=`` raise :class:`PolicyError`. The class is built on first use
        (by ``_hardened_adapter_class``), so importing this module does not import
        ``requests``.
        """

        ssl_context: HardenedSSLContext

        def __init__(
            self,
            policy: TlsPolicy | None = None,
            *,
            identity: ClientIdentity | None = None,
            context: HardenedSSLContext | None = None,
            **adapter_options: Any,
        ) -> None: ...


def _environment_bundles() -> set[str]:
    """CA bundles requests takes from the environment (``trust_env``) as ``verify``."""
    import os

    return {
        value
        for value in (os.environ.get(n) for n in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"))
        if value
    }


def _refuse_weakening(verify: Any, cert: Any) -> None:
    """Refuse what would change the context's trust; an environment CA bundle is left
    out instead (not trusting it is stricter, never weaker)."""
    if isinstance(verify, str) and verify in _environment_bundles():
        logger.debug("HardenedAdapter: CA bundle %s from the environment not used", verify)
        verify = True
    if verify is False:
        raise PolicyError(
            "verify=False is not allowed through HardenedAdapter: the hub's certificate "
            "is always verified against the policy's pinned roots"
        )
    if isinstance(verify, str):
        raise PolicyError(
            f"verify={verify!r} would trust a CA bundle next to the pinned roots; put "
            "extra roots in TlsPolicy(roots=RootSet.from_pem_file(path)) instead"
        )
    if cert:
        raise PolicyError(
            "cert= is not used with HardenedAdapter: give the device certificate to the "
            "adapter as identity=ClientIdentity.from_files(certfile, keyfile)"
        )


def _hardened_adapter_class() -> type[HardenedAdapter]:
    try:
        from requests.adapters import HTTPAdapter
    except ImportError:
        raise MissingDependencyError("requests", "requests") from None  # an extra to add

    class _Adapter(HTTPAdapter):
        """A ``requests`` adapter whose TLS is a :class:`HardenedSSLContext`.

        ``session.mount("https://", HardenedAdapter(policy, identity=identity))``.

        requests normally points urllib3 at certifi's bundle (``verify=True``), which
        makes urllib3 call ``load_verify_locations`` on the context — a hardened context
        refuses that (it would defeat pinning). This adapter keeps the bundle away and
        certificate verification required, so the trust anchors stay exactly the
        policy's roots. ``verify=False``, a ``verify`` path and ``cert=`` raise
        :class:`PolicyError`.
        """

        def __init__(
            self,
            policy: TlsPolicy | None = None,
            *,
            identity: ClientIdentity | None = None,
            context: HardenedSSLContext | None = None,
            **adapter_options: Any,
        ) -> None:
            if context is None:
                context = create_ssl_context(policy, identity=identity)
            elif policy is not None or identity is not None:
                raise PolicyError("give either context= or policy=/identity=, not both")
            if not isinstance(context, HardenedSSLContext):
                raise PolicyError(
                    "context must come from iothub_tls.create_ssl_context(), got "
                    f"{type(context).__name__}"
                )
            self.ssl_context = context
            super().__init__(**adapter_options)

        def init_poolmanager(
            self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
        ) -> None:
            pool_kwargs["ssl_context"] = self.ssl_context
            super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            proxy_kwargs.setdefault("ssl_context", self.ssl_context)
            return super().proxy_manager_for(proxy, **proxy_kwargs)

        def send(
            self,
            request: PreparedRequest,
            stream: bool = False,
            timeout: Any = None,
            verify: Any = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> Response:
            # Here, not deeper: requests turns a ValueError raised while it picks the
            # pool into InvalidURL, which would hide the reason.
            _refuse_weakening(verify, cert)
            return super().send(
                request, stream=stream, timeout=timeout, verify=True, cert=None, proxies=proxies
            )

        def build_connection_pool_key_attributes(
            self, request: PreparedRequest, verify: Any, cert: Any = None
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            host_params, pool_kwargs = super().build_connection_pool_key_attributes(
                request, verify, cert
            )
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
            pool_kwargs["ssl_context"] = self.ssl_context
            pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
            return host_params, pool_kwargs

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            # Not super(): that would set conn.ca_certs to certifi's bundle.
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None

    _Adapter.__module__ = __name__
    _Adapter.__name__ = _Adapter.__qualname__ = "HardenedAdapter"
    # The class made here is the one the TYPE_CHECKING declaration above describes.
    return cast("type[HardenedAdapter]", cast(Any, _Adapter))


def __getattr__(name: str) -> Any:
    if name == "HardenedAdapter":
        cls = _hardened_adapter_class()
        globals()["HardenedAdapter"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
