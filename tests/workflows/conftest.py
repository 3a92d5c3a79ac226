from ..nodes.fake_comfy_api import install

install()
