// An app-shaped program on the JVM: connect to a hub, show what happens to the connections (a
// Flow of ClientEvent), and come back after a (simulated) network change.
//
//     java … dev.keyway.example.AppKt <app.key> <relay host:port> <relay key> <hub> <hub key>
//
// What an Android app does with Keyway, in order: send the library's logs to its own log
// (setLogger), collect client.eventFlow() for a status line, talk to the hub through an
// end-to-end stream, and when ConnectivityManager's NetworkCallback reports a new network call
// client.networkChanged(): the connections over the old network go at once and the next
// connect dials from the new one, resuming with the ticket the client kept. bindings/run-tests.sh
// runs it (from bindings/kotlin/test/Main.kt) against a real relay and hub.
package dev.keyway.example

import dev.keyway.Client
import dev.keyway.ClientEvent
import dev.keyway.Identity
import dev.keyway.LogLevel
import dev.keyway.LogRecord
import dev.keyway.LogSink
import dev.keyway.setLogger
import kotlinx.coroutines.CoroutineStart
import kotlinx.coroutines.cancelAndJoin
import kotlinx.coroutines.coroutineScope
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking

/** The client's events as a Flow: it ends when the client is gone. */
fun Client.eventFlow(): Flow<ClientEvent> = flow {
    val stream = events()
    while (true) {
        emit(stream.next() ?: break)
    }
}

/** Where an Android app would call android.util.Log.println. */
object StderrLog : LogSink {
    override fun log(record: LogRecord) {
        System.err.println("${record.level} ${record.target}: ${record.message}")
    }
}

/** One line per event: what a status line would show. */
fun describe(event: ClientEvent): String = when (event) {
    is ClientEvent.RelayUp -> "RelayUp relay=${event.relay}"
    is ClientEvent.RelayDown -> "RelayDown reason=${event.reason} detail=${event.detail}"
    is ClientEvent.HubConnected -> "HubConnected hub=${event.hub} resumed=${event.resumed}"
    is ClientEvent.HubLost -> "HubLost hub=${event.hub} reason=${event.reason} detail=${event.detail}"
    is ClientEvent.Missed -> "Missed count=${event.count}"
}

suspend fun echo(client: Client, hub: String, hubKey: String, text: String): String {
    val stream = client.connect(hub, hubKey)
    try {
        stream.write(text.toByteArray())
        var got = ByteArray(0)
        while (got.size < text.length) {
            val chunk = stream.read(65536u)
            if (chunk.isEmpty()) break
            got += chunk
        }
        return String(got)
    } finally {
        stream.shutdown()
    }
}

/** The app's run; returns the event lines it showed (for the test). */
suspend fun runApp(keyPath: String, relay: String, relayKey: String, hub: String, hubKey: String): List<String> =
    coroutineScope {
        setLogger(StderrLog, LogLevel.INFO)
        val client = Client(Identity.load(keyPath), relay, relayKey)
        val shown = java.util.Collections.synchronizedList(mutableListOf<String>())
        val status = launch(start = CoroutineStart.UNDISPATCHED) {
            client.eventFlow().collect { event ->
                val line = describe(event)
                shown.add(line)
                println("event: $line")
            }
        }
        println("reply: ${echo(client, hub, hubKey, "before")}")
        println("network changed")
        client.networkChanged()
        println("reply: ${echo(client, hub, hubKey, "after")}")
        println("path stats: ${client.pathStats()}")
        client.disconnect()
        delay(200) // the last events (closed by the app) reach the status line
        status.cancelAndJoin()
        setLogger(null, LogLevel.ERROR)
        client.close()
        shown.toList()
    }

fun main(args: Array<String>) = runBlocking {
    require(args.size == 5) { "usage: <app.key> <relay host:port> <relay key> <hub> <hub key>" }
    runApp(args[0], args[1], args[2], args[3], args[4])
    Unit
}
