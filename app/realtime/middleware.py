"""Operational endpoints answered before Host validation, and no root path.

Kubelet probes and Prometheus scrapes address a pod by its IP, which is not
(and should not be) in DJANGO_ALLOWED_HOSTS; Django would answer them 400.
/healthz, /readyz and /metrics are therefore served here, first in the
middleware chain, whatever the Host header says. They expose no user data.

They are matched on the full path (``request.path``), never on
``path_info``: Daphne takes a root path from any client's Daphne-Root-Path
header and Django strips it from ``path_info``, so ``/ws/metrics`` with
``Daphne-Root-Path: /ws`` would match ``/metrics`` past nginx, which only
hides ``/metrics`` itself. For the same reason any request that carries a
root path is refused: the blueprint is served at ``/``, nginx clears the
header, and with it ``/ws/`` (which nginx sends to Daphne) could serve
every page.
"""

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction
from django.core.handlers.asgi import ASGIRequest
from django.http import JsonResponse
from django.utils.decorators import sync_and_async_middleware

from realtime import views
from realtime.metrics import metrics_view

# gunicorn: readiness checks on a thread of their own, never a loop per request.
WSGI_VIEWS = {"/healthz": views.healthz, "/readyz": views.readyz_sync, "/metrics": metrics_view}
# Daphne: readiness checks on the server's loop. The core layer lets one loop
# at a time receive, and the consumers' receives are on the server's loop.
ASGI_VIEWS = {**WSGI_VIEWS, "/readyz": views.readyz}


def _root_path_refused() -> JsonResponse:
    return JsonResponse(
        {"status": "error", "code": "not_found", "detail": "this server is served at /: a root path is not accepted"},
        status=404,
    )


@sync_and_async_middleware
def operational_endpoints(get_response):
    if iscoroutinefunction(get_response):

        async def middleware(request):
            if request.META.get("SCRIPT_NAME"):
                return _root_path_refused()
            view = ASGI_VIEWS.get(request.path)
            if view is None:
                return await get_response(request)
            response = view(request)
            return await response if iscoroutinefunction(view) else response

        return markcoroutinefunction(middleware)

    # Daphne too runs this branch, in a worker thread, when a middleware
    # further in is sync-only (WhiteNoise is). async_to_sync there hands the
    # view to Daphne's running loop; it makes a new loop only under gunicorn,
    # which never gets an async view.
    def middleware(request):
        if request.META.get("SCRIPT_NAME"):
            return _root_path_refused()
        view = (ASGI_VIEWS if isinstance(request, ASGIRequest) else WSGI_VIEWS).get(request.path)
        if view is None:
            return get_response(request)
        return async_to_sync(view)(request) if iscoroutinefunction(view) else view(request)

    return middleware
