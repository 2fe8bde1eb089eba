"""Checked by ``mypy --strict`` in scripts/test, never run: every device client satisfies
the one :class:`iothub_tls.DeviceClient` protocol, instances and classes (factories)."""

from __future__ import annotations

from iothub_tls import AsyncDeviceClient, DeviceClient, aio
from iothub_tls.amqp import AmqpDeviceClient
from iothub_tls.https import HttpsDeviceClient
from iothub_tls.mqtt import MqttDeviceClient


def mqtt(client: MqttDeviceClient) -> DeviceClient:
    return client


def amqp(client: AmqpDeviceClient) -> DeviceClient:
    return client


def https(client: HttpsDeviceClient) -> DeviceClient:
    return client


CLASSES: tuple[type[DeviceClient], ...] = (MqttDeviceClient, AmqpDeviceClient, HttpsDeviceClient)


def mqtt_aio(client: aio.MqttDeviceClient) -> AsyncDeviceClient:
    return client


def amqp_aio(client: aio.AmqpDeviceClient) -> AsyncDeviceClient:
    return client


def https_aio(client: aio.HttpsDeviceClient) -> AsyncDeviceClient:
    return client
