// Reads herald's stream with JDK 17's java.net.http.HttpClient (default settings: it offers an
// h2c upgrade and sends Content-Length: 0); prints the response's `connection` header, then
// `data:<data>` per event. Run as `java JdkStream.java URL` by tests/blackbox/clients.rs.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.util.stream.Stream;

public class JdkStream {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
                .header("Accept", "text/event-stream")
                .build();
        HttpResponse<Stream<String>> response =
                client.send(request, HttpResponse.BodyHandlers.ofLines());
        System.out.println("status:" + response.statusCode());
        System.out.println("connection:" + response.headers().firstValue("connection").orElse(""));
        System.out.flush();
        response.body().forEach(line -> {
            if (line.startsWith("data:")) {
                System.out.println("data:" + line.substring(5).stripLeading());
                System.out.flush();
            }
        });
    }
}
