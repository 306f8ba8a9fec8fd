"""How a blob's bytes reach a client: the pipes handed out (``pipe``), the running digest check (``verify``), and
one transfer path every producer uses (``producers``): a blob that verifies itself goes into the pipe as it can
(``Blob.send_to``: sendfile from its file), any other is hashed on its way."""
