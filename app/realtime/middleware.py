"""Operational endpoints answered before Host validation.

Kubelet probes and Prometheus scrapes address a pod by its IP, which is not
(and should not be) in DJANGO_ALLOWED_HOSTS; Django would answer them 400.
/healthz, /readyz and /metrics are therefore served here, first in the
middleware chain, whatever the Host header says. They expose no user data.
"""
from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction
from django.utils.decorators import sync_and_async_middleware

from realtime import views
from realtime.metrics import metrics_view

OPERATIONAL_VIEWS = {"/healthz": views.healthz, "/readyz": views.readyz, "/metrics": metrics_view}


@sync_and_async_middleware
def operational_endpoints(get_response):
    if iscoroutinefunction(get_response):

        async def middleware(request):
            view = OPERATIONAL_VIEWS.get(request.path_info)
            if view is None:
                return await get_response(request)
            response = view(request)
            return await response if iscoroutinefunction(view) else response

        return markcoroutinefunction(middleware)

    def middleware(request):
        view = OPERATIONAL_VIEWS.get(request.path_info)
        if view is None:
            return get_response(request)
        return async_to_sync(view)(request) if iscoroutinefunction(view) else view(request)

    return middleware
