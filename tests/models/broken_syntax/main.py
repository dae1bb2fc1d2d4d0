from ws_server import AnythingBaseModel

class Broken(AnythingBaseModel)
    pass
