"""How a blob's bytes reach a client: the pipes handed out (``pipe``) and one transfer path every producer uses
(``producers``). A blob that verifies itself goes into the pipe as it can (``Blob.send_to``: sendfile from its
file); any other is hashed on its way."""
