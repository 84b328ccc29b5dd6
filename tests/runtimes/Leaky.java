// A deliberately leaky TCP echo server in Java 17, for cwreap's tests.
//
//     java --add-opens java.base/java.net=ALL-UNNAMED --add-opens java.base/java.io=ALL-UNNAMED \
//          -cp DIR Leaky [--listen ADDR]... [--mode echo|drop|hold]
//
// ADDR is HOST:PORT, IPv6 as [HOST]:PORT (default 127.0.0.1:0). stdout, one event per line:
// `listen ADDR` per listener, `ready`, `accepted FD LOCAL REMOTE`, `eof FD` (the peer
// half-closed), `error TEXT`.
//
// --mode echo (the default): a thread per connection echoes; at EOF it returns without
// close(). The Socket stays in a static list, so neither the GC nor a Cleaner ever closes it:
// the socket stays in CLOSE_WAIT.
// --mode drop: the same, but at EOF the Socket is dropped (no reference left anywhere): it
// stays in CLOSE_WAIT until a collection finds it unreachable and the socket's Cleaner
// closes its fd (`jcmd PID GC.run` makes one happen).
// --mode hold: an accepted Socket goes straight into the static list, never read (the
// peer's FIN stays unread: recv_q 1) and never closed; no `eof` line.
// The fd number comes from reflection on the socket's FileDescriptor (hence the add-opens);
// when that is not possible, FD is -1.
//
// Java sockets are dual-stack: a listener on 127.0.0.1 is an AF_INET6 socket bound to
// ::ffff:127.0.0.1, so the kernel (ss, sock_diag) shows v4-mapped addresses while Java
// itself prints the plain IPv4 ones.

import java.io.FileDescriptor;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.lang.reflect.Field;
import java.net.Inet6Address;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

public class Leaky {
    static final List<Socket> LEAKED = Collections.synchronizedList(new ArrayList<>());

    static String mode = "echo";

    static synchronized void say(String line) {
        System.out.println(line);
        System.out.flush();
    }

    static String fmt(InetAddress a, int port) {
        String h = a.getHostAddress();
        int pct = h.indexOf('%');
        if (pct >= 0) {
            h = h.substring(0, pct);
        }
        return (a instanceof Inet6Address) ? "[" + h + "]:" + port : h + ":" + port;
    }

    /** The first field of type `type` in `cls` or its superclasses, made accessible. */
    static Field fieldOfType(Class<?> cls, Class<?> type) {
        for (Class<?> c = cls; c != null; c = c.getSuperclass()) {
            for (Field f : c.getDeclaredFields()) {
                if (f.getType() == type) {
                    f.setAccessible(true);
                    return f;
                }
            }
        }
        return null;
    }

    /** The kernel fd of `s`: Socket.impl (a SocketImpl) -> its FileDescriptor -> int fd. */
    static int fdOf(Socket s) {
        try {
            Field implField = Socket.class.getDeclaredField("impl");
            implField.setAccessible(true);
            Object impl = implField.get(s);
            Field fdField = fieldOfType(impl.getClass(), FileDescriptor.class);
            if (fdField == null) {
                return -1;
            }
            FileDescriptor fd = (FileDescriptor) fdField.get(impl);
            Field num = FileDescriptor.class.getDeclaredField("fd");
            num.setAccessible(true);
            return num.getInt(fd);
        } catch (ReflectiveOperationException | RuntimeException e) {
            return -1;
        }
    }

    static void handle(Socket s) {
        int fd = fdOf(s);
        say("accepted " + fd + " " + fmt(s.getLocalAddress(), s.getLocalPort()) + " "
                + fmt(s.getInetAddress(), s.getPort()));
        byte[] buf = new byte[65536];
        try {
            InputStream in = s.getInputStream();
            OutputStream out = s.getOutputStream();
            while (true) {
                int n = in.read(buf);
                if (n < 0) {
                    say("eof " + fd);
                    break;
                }
                out.write(buf, 0, n);
                out.flush();
            }
        } catch (IOException e) {
            say("error fd " + fd + ": " + e);
        }
        // Leak: never close. In echo mode keep a reference so nothing else closes it either;
        // in drop mode let go of it: the Socket is unreachable once this thread ends.
        if (mode.equals("echo")) {
            LEAKED.add(s);
        }
    }

    /** Hold mode: keep the Socket, never read it, never close it. */
    static void hold(Socket s) {
        say("accepted " + fdOf(s) + " " + fmt(s.getLocalAddress(), s.getLocalPort()) + " "
                + fmt(s.getInetAddress(), s.getPort()));
        LEAKED.add(s);
    }

    public static void main(String[] args) throws Exception {
        List<String> addrs = new ArrayList<>();
        for (int i = 0; i < args.length; i++) {
            if (args[i].equals("--listen") && i + 1 < args.length) {
                addrs.add(args[++i]);
            } else if (args[i].equals("--mode") && i + 1 < args.length
                    && List.of("echo", "drop", "hold").contains(args[i + 1])) {
                mode = args[++i];
            } else {
                System.err.println("usage: Leaky [--listen ADDR]... [--mode echo|drop|hold]");
                System.exit(2);
            }
        }
        if (addrs.isEmpty()) {
            addrs.add("127.0.0.1:0");
        }
        List<ServerSocket> servers = new ArrayList<>();
        for (String a : addrs) {
            int i = a.lastIndexOf(':');
            String host = a.substring(0, i);
            if (host.startsWith("[") && host.endsWith("]")) {
                host = host.substring(1, host.length() - 1);
            }
            int port = Integer.parseInt(a.substring(i + 1));
            ServerSocket ss = new ServerSocket();
            ss.setReuseAddress(true);
            ss.bind(new InetSocketAddress(InetAddress.getByName(host), port), 128);
            servers.add(ss);
        }
        for (ServerSocket ss : servers) {
            say("listen " + fmt(ss.getInetAddress(), ss.getLocalPort()));
        }
        List<Thread> acceptors = new ArrayList<>();
        for (ServerSocket ss : servers) {
            Thread t = new Thread(() -> {
                while (true) {
                    Socket s;
                    try {
                        s = ss.accept();
                    } catch (IOException e) {
                        say("error accept: " + e);
                        return;
                    }
                    if (mode.equals("hold")) {
                        hold(s);
                        continue;
                    }
                    Thread h = new Thread(() -> handle(s));
                    h.setDaemon(true);
                    h.start();
                }
            });
            t.start();
            acceptors.add(t);
        }
        say("ready");
        for (Thread t : acceptors) {
            t.join();
        }
    }
}
