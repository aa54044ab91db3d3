// The Kotlin binding on the JVM against a real keyway-relay and keyway-hub (the workspace's
// built binaries, from KEYWAY_BIN_DIR): pair with a one-time code, connect, echo through the
// stream, the library's logs through a LogSink (never holding the private key), and the typed
// errors an app branches on. A plain `main` (no JUnit on this machine):
// it throws, and the JVM exits non-zero, on the first failed check.
package dev.keyway.test

import dev.keyway.Client
import dev.keyway.Identity
import dev.keyway.KeywayException
import dev.keyway.LogLevel
import dev.keyway.LogRecord
import dev.keyway.LogSink
import dev.keyway.Refusal
import dev.keyway.fileStorage
import dev.keyway.pair
import dev.keyway.setLogger
import java.io.File
import java.net.DatagramSocket
import java.net.HttpURLConnection
import java.net.InetAddress
import java.net.ServerSocket
import java.net.URI
import java.nio.file.Files
import java.util.Base64
import java.util.concurrent.ConcurrentLinkedQueue
import java.util.concurrent.TimeUnit
import kotlin.concurrent.thread
import kotlinx.coroutines.runBlocking

/** Bounds every wait for a process to come up (never an assertion on time). */
const val PATIENCE_MS = 30_000L

val bins = File(System.getenv("KEYWAY_BIN_DIR") ?: error("KEYWAY_BIN_DIR is not set"))
val dir: File = Files.createTempDirectory("keyway-kotlin").toFile()
val procs = mutableListOf<Process>()
var passed = 0

fun check(what: String, ok: Boolean) {
    if (!ok) error("FAILED: $what")
    println("ok: $what")
    passed++
}

fun spawn(vararg args: String): Process {
    val cmd = listOf(File(bins, args[0]).path) + args.drop(1)
    val pb = ProcessBuilder(cmd).directory(dir).redirectOutput(ProcessBuilder.Redirect.DISCARD)
        .redirectError(ProcessBuilder.Redirect.INHERIT)
    pb.environment()["RUST_LOG"] = "warn"
    return pb.start().also { procs.add(it) }
}

fun run(vararg args: String): String {
    val p = ProcessBuilder(listOf(File(bins, args[0]).path) + args.drop(1)).directory(dir)
        .redirectError(ProcessBuilder.Redirect.INHERIT).start()
    val out = p.inputStream.bufferedReader().readText()
    if (!p.waitFor(PATIENCE_MS, TimeUnit.MILLISECONDS) || p.exitValue() != 0) error("${args.joinToString(" ")} failed")
    return out
}

fun freeUdp(): Int = DatagramSocket(0, InetAddress.getLoopbackAddress()).use { it.localPort }
fun freeTcp(): Int = ServerSocket(0, 1, InetAddress.getLoopbackAddress()).use { it.localPort }

fun waitHttp(url: String) {
    val deadline = System.currentTimeMillis() + PATIENCE_MS
    while (System.currentTimeMillis() < deadline) {
        try {
            val c = URI(url).toURL().openConnection() as HttpURLConnection
            c.connectTimeout = 1000
            c.readTimeout = 1000
            if (c.responseCode == 200) return
        } catch (_: Exception) {
        }
        Thread.sleep(50)
    }
    error("$url did not come up")
}

/** A TCP echo service on loopback: what the hub forwards sessions to. */
fun echoService(): Int {
    val server = ServerSocket(0, 50, InetAddress.getLoopbackAddress())
    thread(isDaemon = true) {
        while (true) {
            val socket = server.accept()
            thread(isDaemon = true) { socket.use { it.getInputStream().copyTo(it.getOutputStream()) } }
        }
    }
    return server.localPort
}

/** The library's log records, as an app's sink would receive them (on the library's threads). */
class CapturedLogs : LogSink {
    val records = ConcurrentLinkedQueue<LogRecord>()
    override fun log(record: LogRecord) {
        records.add(record)
    }
}

/** Text forms of the app's private key a log line could hold (the Python test checks more). */
fun privateKeyForms(identity: Identity): List<String> {
    val der = identity.toBytes()
    val seed = der.copyOfRange(16, 48) // an Ed25519 PKCS#8 document's seed
    val hex = seed.joinToString("") { "%02x".format(it) }
    val b64 = Base64.getEncoder().withoutPadding()
    return listOf(hex, hex.uppercase(), b64.encodeToString(seed), b64.encodeToString(der),
        Base64.getUrlEncoder().withoutPadding().encodeToString(seed), seed.joinToString(", ") { (it.toInt() and 0xff).toString() })
}

fun main() = runBlocking {
    try {
        test()
    } finally {
        procs.forEach { it.destroyForcibly().waitFor() }
        dir.deleteRecursively()
    }
    // The plain closing line CI reads.
    println("kotlin: $passed passed, 0 failed")
}

suspend fun test() {
    val relayId = Identity.generate()
    relayId.save(File(dir, "relay.key").path)
    val hubId = Identity.generate()
    hubId.save(File(dir, "hub.key").path)
    File(dir, "authorized_hubs").writeText("home ${hubId.publicKey()}\n")
    File(dir, "authorized_apps").writeText("")
    val relay = "127.0.0.1:${freeUdp()}"
    val relayMetrics = "127.0.0.1:${freeTcp()}"
    spawn("keyway-relay", "run", "--listen", relay, "--key", "relay.key", "--hubs", "authorized_hubs",
        "--metrics-listen", relayMetrics)
    waitHttp("http://$relayMetrics/metrics")
    val hubMetrics = "127.0.0.1:${freeTcp()}"
    val relayArgs = arrayOf("--relay", relay, "--relay-key", relayId.publicKey())
    spawn("keyway-hub", "run", *relayArgs, "--name", "home", "--key", "hub.key", "--apps", "authorized_apps",
        "--forward", "127.0.0.1:${echoService()}", "--metrics-listen", hubMetrics)
    waitHttp("http://$hubMetrics/healthz")

    // Pair: the app's key and known hubs go to the file storage (the CLI's app.key files).
    val code = run("keyway-hub", "pair", *relayArgs, "--name", "home", "--key", "hub.key",
        "--apps", "authorized_apps", "--label", "kotlin", "--ttl", "1m", "--no-wait", "--no-qr").trim().lines().last()
    val storage = fileStorage(File(dir, "app.key").path)
    val identity = Identity.fromStorage(storage)
    // Everything the library says, through pairing and the first connect.
    val logs = CapturedLogs()
    setLogger(logs, LogLevel.TRACE)
    val paired = pair(code, identity, storage)
    check("pairing names the hub and its key", paired.hub == "home" && paired.hubKey == hubId.publicKey())
    check("the storage remembers the hub", storage.loadHubs() == listOf(paired))

    // Connect and echo.
    val client = Client.fromPairing(identity, paired)
    val stream = client.connect(paired.hub, paired.hubKey)
    val message = "hello from kotlin".toByteArray()
    stream.write(message)
    var got = ByteArray(0)
    while (got.size < message.size) {
        val chunk = stream.read(65536u)
        if (chunk.isEmpty()) break
        got += chunk
    }
    check("echo through the end-to-end stream", got.contentEquals(message))
    stream.finish()
    check("end of stream is empty bytes", stream.read(16u).isEmpty())
    setLogger(null, LogLevel.ERROR)
    val targets = logs.records.map { it.target.substringBefore("::") }.toSet()
    check("the log sink got the client's and QUIC's records at TRACE (${logs.records.size})",
        "keyway_client" in targets && "quinn_proto" in targets && logs.records.any { it.level == LogLevel.TRACE })
    val forms = privateKeyForms(identity)
    check("no log record holds the private key",
        logs.records.none { r -> forms.any { r.message.contains(it) || r.target.contains(it) } })
    stream.shutdown()
    val afterClose = try {
        stream.read(16u)
        null
    } catch (e: KeywayException.StreamClosed) {
        e
    }
    check("read after close is KeywayException.StreamClosed", afterClose != null)

    // A wrong hub key is a typed refusal carrying its reason.
    val wrong = try {
        client.connect("home", Identity.generate().publicKey())
        null
    } catch (e: KeywayException.Refused) {
        e
    }
    check("wrong hub key is Refused(HUB_KEY_MISMATCH)", wrong?.reason == Refusal.HUB_KEY_MISMATCH)
    val bad = try {
        client.connect("home", "kwnotakey")
        null
    } catch (e: KeywayException.BadArgument) {
        e
    }
    check("bad key text is BadArgument", bad != null)

    // The README's snippet, as written there (extracted by run-tests.sh).
    val reply = readmeExample(File(dir, "app.key").path, relay, relayId.publicKey(), hubId.publicKey())
    check("the README's Kotlin snippet echoes", String(reply) == "hello")

    // The example app (bindings/kotlin/example/App.kt): events as a Flow, a network change.
    val shown = dev.keyway.example.runApp(File(dir, "app.key").path, relay, relayId.publicKey(), "home",
        hubId.publicKey())
    check("the example app showed the relay and the hub connection up first: $shown",
        shown.size >= 2 && shown[0].startsWith("RelayUp") && shown[1].startsWith("HubConnected hub=home resumed=false"))
    check("after the network change the example app's hub connection resumed",
        shown.drop(2).any { it.startsWith("HubLost hub=home reason=CLOSED") } &&
            shown.drop(2).any { it == "HubConnected hub=home resumed=true" })

    // Backgrounded and back: disconnect() drops everything; the next connect dials again.
    client.disconnect()
    val again = client.connect(paired.hub, paired.hubKey)
    again.write("again".toByteArray())
    check("connect after close works", again.read(5u).isNotEmpty())
    again.shutdown()
    client.disconnect()
}
