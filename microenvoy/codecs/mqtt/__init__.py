"""Sans-IO MQTT 3.1.1 and 5.0: the packet model (``packets``) and the server-side codec (``codec``).

Import the submodules directly (``from microenvoy.codecs.mqtt.packets import Publish``); this package module
stays empty so importing the packet model never loads the codec.
"""
