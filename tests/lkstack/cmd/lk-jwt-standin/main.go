// Command lk-jwt-standin behaves as lk-jwt-service does, for the end-to-end tests and the demo:
// lk-jwt-service is not published as a Go module, so it cannot be installed here. Written from
// its documented behaviour (endpoints, request shapes, errors, CORS headers, names), it reads
// requests with Go's encoding/json through package lkjwt, checks the OpenID token against the
// homeserver's federation userinfo endpoint, and mints LiveKit tokens with livekit/protocol.
//
// Flags: --listen 127.0.0.1:0, --key, --secret, --livekit-url, --sfu-get-shapes both|legacy,
// and --homeserver server_name=base_url (repeatable): where the OpenID userinfo of a server
// name is asked (lk-jwt-service finds it through Matrix server discovery). Once bound it
// prints "listening on http://ADDRESS".
//
// Application service (MSC4512, the routes Synapse forwards to the service's proxy_url):
// --hs-token (the routes are served only when it is given), --as-token, --server-name (our
// homeserver's name) and --synapse (its base URL, asked for MSC4502 is_joined with the
// as_token). Every route below wants "Authorization: Bearer <hs_token>" (401 M_MISSING_TOKEN
// or M_UNKNOWN_TOKEN) and POST:
//
//	/_matrix/client/{unstable/io.element.msc4195,v1}/rtc/livekit/get_token
//	    user from X-Matrix-User-Identifier; body {room_id, slot_id, member_id, url, server_name?};
//	    a server_name of another homeserver is refused (502: no relaying over federation).
//	/_matrix/federation/{unstable/io.element.msc4195,v1}/rtc/livekit/get_token
//	    origin from X-Matrix-Origin; body {user_id, url, room_id, slot_id, member_id}; the
//	    user's server must be the origin; the token is subscribe-only.
//	/_matrix/client/{unstable/io.element.msc4195,v1}/rtc/livekit/delegate_delayed_leave, /_matrix/app/v1/ping
//	    200 {}.
//
// A token route checks that url is --livekit-url, that the user is joined to the room (and,
// for federation, that our server is), calls LiveKit's CreateRoom for the alias and answers
// 200 {"jwt"}: identity b64(sha256(json [user_id, member_id])), room b64(sha256(json
// [room_id, slot_id])).
//
// Routes served always: POST /sfu/get and /get_token (legacy, OpenID), POST /sfu_webhook
// (LiveKit's webhooks, signature checked), GET /healthz, and GET /stats: {"requests": {route:
// N}, "issued": {"client", "federation", "legacy"}, "create_room": {"client", "federation"},
// "create_room_failed": {...}, "webhooks": {"accepted", "refused"}}.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"vlg-oracle/lkjwt"
)

type homeservers map[string]string

func (h homeservers) String() string { return fmt.Sprint(map[string]string(h)) }

func (h homeservers) Set(value string) error {
	name, base, ok := strings.Cut(value, "=")
	if !ok {
		return fmt.Errorf("expected server_name=base_url, got %q", value)
	}
	h[name] = strings.TrimRight(base, "/")
	return nil
}

type service struct {
	key, secret, livekitURL string
	legacyOnly              bool
	servers                 homeservers
	client                  *http.Client
	as                      *appservice // nil: no application-service routes
	stats                   *stats
}

func corsHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Allow-Methods", "POST")
	h.Set("Access-Control-Allow-Headers", "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token")
}

func writeError(w http.ResponseWriter, status int, errcode, message string) {
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"errcode": errcode, "error": message})
}

// verifiedUser asks the homeserver named in the token who it belongs to, as Matrix OpenID
// consumers do (GET /_matrix/federation/v1/openid/userinfo).
func (s *service) verifiedUser(token lkjwt.OpenIDToken) (string, error) {
	base, ok := s.servers[token.MatrixServerName]
	if !ok {
		return "", fmt.Errorf("no homeserver known for %q", token.MatrixServerName)
	}
	resp, err := s.client.Get(base + "/_matrix/federation/v1/openid/userinfo?access_token=" +
		url.QueryEscape(token.AccessToken))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("userinfo: HTTP %d", resp.StatusCode)
	}
	var info struct {
		Sub string `json:"sub"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil || info.Sub == "" {
		return "", fmt.Errorf("userinfo: no sub (%v)", err)
	}
	if _, server, _ := strings.Cut(info.Sub, ":"); server != token.MatrixServerName {
		return "", fmt.Errorf("userinfo: %s is not a user of %s", info.Sub, token.MatrixServerName)
	}
	return info.Sub, nil
}

func (s *service) token(w http.ResponseWriter, r *http.Request) {
	corsHeaders(w)
	switch r.Method {
	case http.MethodOptions:
		w.WriteHeader(http.StatusOK)
		return
	case http.MethodPost:
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	s.stats.add(&s.stats.Requests, "legacy")
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_NOT_JSON", "Error reading request")
		return
	}
	request, refusal := lkjwt.Read(r.URL.Path, body, s.legacyOnly)
	if refusal != nil {
		writeError(w, http.StatusBadRequest, refusal.Errcode, refusal.Message)
		return
	}
	user, err := s.verifiedUser(request.OpenID)
	if err != nil {
		log.Printf("%s: OpenID check failed: %v", r.URL.Path, err)
		if request.Shape == "legacy" {
			writeError(w, http.StatusInternalServerError, "M_LOOKUP_FAILED", "Failed to look up user info from homeserver")
		} else {
			writeError(w, http.StatusUnauthorized, "M_UNAUTHORIZED", "The request could not be authorised.")
		}
		return
	}
	if request.Shape == "new" && request.ClaimedUserID != user {
		writeError(w, http.StatusUnauthorized, "M_UNAUTHORIZED", "The request could not be authorised.")
		return
	}
	jwt, err := s.mint(request.Identity(user), request.Alias(), true)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "Internal Server Error")
		return
	}
	s.stats.add(&s.stats.Issued, "legacy")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(struct {
		URL string `json:"url"`
		JWT string `json:"jwt"`
	}{s.livekitURL, jwt})
}

func main() {
	s := &service{servers: homeservers{}, client: &http.Client{Timeout: 10 * time.Second}, stats: newStats()}
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	shapes := flag.String("sfu-get-shapes", "both", "body shapes /sfu/get takes: both (0.4.0 to 0.5.0) or legacy")
	flag.StringVar(&s.key, "key", "", "LiveKit API key")
	flag.StringVar(&s.secret, "secret", "", "LiveKit API secret")
	flag.StringVar(&s.livekitURL, "livekit-url", "", "LiveKit URL handed to clients")
	flag.Var(s.servers, "homeserver", "server_name=base_url of a homeserver's federation API (repeatable)")
	hsToken := flag.String("hs-token", "", "application service hs_token; serves the routes Synapse forwards")
	asToken := flag.String("as-token", "", "application service as_token, for is_joined")
	serverName := flag.String("server-name", "", "our homeserver's server name")
	synapse := flag.String("synapse", "", "our homeserver's base URL, for is_joined")
	flag.Parse()
	if s.key == "" || s.secret == "" || s.livekitURL == "" || (*shapes != "both" && *shapes != "legacy") {
		flag.Usage()
		os.Exit(2)
	}
	s.legacyOnly = *shapes == "legacy"
	if *hsToken != "" {
		as, err := newAppservice(*hsToken, *asToken, *serverName, *synapse, s.livekitURL, s.key, s.secret)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		s.as = as
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/sfu/get", s.token)
	mux.HandleFunc("/get_token", s.token)
	mux.HandleFunc("/sfu_webhook", s.sfuWebhook)
	mux.HandleFunc("/stats", s.stats.serve)
	if s.as != nil {
		s.routeAppservice(mux)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on http://%s\n", listener.Addr())
	log.Fatal(http.Serve(listener, mux))
}
