-- wrk script: asynchronous POSTs, reported by bench/report.lua.
wrk.method = "POST"
wrk.body = os.getenv("NIMBUS_BODY") or "event"
wrk.headers["Nimbus-Invocation-Type"] = "async"
wrk.headers["Content-Type"] = "text/plain"
dofile(os.getenv("NIMBUS_REPORT"))
