"""HTTP routes; the WebSocket ones are in realtime/routing.py."""

from django.urls import path
from realtime import views

urlpatterns = [
    path("", views.index, name="index"),
    path("chat/<str:room>/", views.room, name="room"),
    path("api/rooms/<str:room>/messages", views.broadcast, name="broadcast"),
    # /healthz, /readyz and /metrics: realtime.middleware, ahead of Host validation.
]
