from twisted.application.service import ServiceMaker

minstore = ServiceMaker(
    "minstore", "minstore.tap", "A minstore node: replicated records over HTTP.", "minstore"
)
