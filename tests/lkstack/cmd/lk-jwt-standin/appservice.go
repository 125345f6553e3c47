package main

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/livekit/protocol/auth"
	"github.com/livekit/protocol/livekit"
	lksdk "github.com/livekit/server-sdk-go/v2"

	"vlg-oracle/lkjwt"
)

// Path prefixes under which Synapse forwards requests to the application service
// (io.element.msc4512.proxy_prefix "rtc/livekit").
var (
	clientPrefixes = []string{
		"/_matrix/client/unstable/io.element.msc4195/rtc/livekit",
		"/_matrix/client/v1/rtc/livekit",
	}
	federationPrefixes = []string{
		"/_matrix/federation/unstable/io.element.msc4195/rtc/livekit",
		"/_matrix/federation/v1/rtc/livekit",
	}
)

// appservice holds what the application-service routes need besides the LiveKit key.
type appservice struct {
	hsToken, asToken string
	serverName       string
	synapse          string // base URL of the homeserver's client API, for is_joined
	rooms            *lksdk.RoomServiceClient
}

// matrixError is a refusal answered as {"errcode", "error"}.
type matrixError struct {
	status           int
	errcode, message string
}

func (e *matrixError) Error() string { return fmt.Sprintf("%d %s: %s", e.status, e.errcode, e.message) }

func refusal(status int, errcode, message string) *matrixError {
	return &matrixError{status, errcode, message}
}

// clientTokenRequest is the body Synapse forwards from a client.
type clientTokenRequest struct {
	RoomID     string `json:"room_id"`
	SlotID     string `json:"slot_id"`
	MemberID   string `json:"member_id"`
	URL        string `json:"url"`
	ServerName string `json:"server_name"`
}

// federationTokenRequest is the body Synapse forwards from another homeserver.
type federationTokenRequest struct {
	UserID   string `json:"user_id"`
	URL      string `json:"url"`
	RoomID   string `json:"room_id"`
	SlotID   string `json:"slot_id"`
	MemberID string `json:"member_id"`
}

func writeJSON(w http.ResponseWriter, status int, value any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(value)
}

func writeRefusal(w http.ResponseWriter, e *matrixError) {
	writeJSON(w, e.status, map[string]string{"errcode": e.errcode, "error": e.message})
}

// authorise checks the hs_token Synapse sends as a bearer token, in constant time.
func (a *appservice) authorise(r *http.Request) *matrixError {
	header := r.Header.Get("Authorization")
	scheme, token, found := strings.Cut(header, " ")
	if header == "" || !found || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return refusal(http.StatusUnauthorized, "M_MISSING_TOKEN", "Missing access token")
	}
	if subtle.ConstantTimeCompare([]byte(token), []byte(a.hsToken)) != 1 {
		return refusal(http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "Unknown access token")
	}
	return nil
}

// readBody decodes a JSON object into v; fields v does not name are ignored.
func readBody(r *http.Request, v any) *matrixError {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return refusal(http.StatusBadRequest, "M_NOT_JSON", "Error reading request")
	}
	if !json.Valid(body) {
		return refusal(http.StatusBadRequest, "M_NOT_JSON", "Request body is not JSON")
	}
	if err := json.Unmarshal(body, v); err != nil {
		return refusal(http.StatusBadRequest, "M_BAD_JSON", err.Error())
	}
	return nil
}

// requireFields refuses the first empty one of name/value pairs.
func requireFields(pairs ...string) *matrixError {
	for i := 0; i+1 < len(pairs); i += 2 {
		if pairs[i+1] == "" {
			return refusal(http.StatusBadRequest, "M_BAD_JSON", "missing "+pairs[i])
		}
	}
	return nil
}

func (a *appservice) checkURL(s *service, u string) *matrixError {
	if u != s.livekitURL {
		return refusal(http.StatusBadRequest, "M_INVALID_PARAM", "url is not the LiveKit URL of this service")
	}
	return nil
}

// isJoined asks the homeserver (MSC4502, with the as_token) whether mxid, or with a
// "server_name" key a server, is joined to the room.
func (a *appservice) isJoined(ctx context.Context, client *http.Client, roomID, key, value string) (bool, error) {
	target := a.synapse + "/_matrix/client/unstable/io.element.msc4502/rooms/" + url.PathEscape(roomID) +
		"/is_joined?" + url.Values{key: {value}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return false, err
	}
	req.Header.Set("Authorization", "Bearer "+a.asToken)
	resp, err := client.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return false, err
	}
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("is_joined: HTTP %d %s", resp.StatusCode, body)
	}
	var answer struct {
		Joined *bool `json:"joined"`
	}
	if err := json.Unmarshal(body, &answer); err != nil || answer.Joined == nil {
		return false, fmt.Errorf("is_joined: no joined in %q (%v)", body, err)
	}
	return *answer.Joined, nil
}

// checkJoined refuses a user the homeserver does not list as joined (403), and answers 502
// when the homeserver cannot say.
func (a *appservice) checkJoined(r *http.Request, client *http.Client, roomID, key, value string) *matrixError {
	joined, err := a.isJoined(r.Context(), client, roomID, key, value)
	if err != nil {
		log.Printf("%s: membership check of %s=%s in %s failed: %v", r.URL.Path, key, value, roomID, err)
		return refusal(http.StatusBadGateway, "M_UNKNOWN", "Unable to check room membership")
	}
	if !joined {
		return refusal(http.StatusForbidden, "M_FORBIDDEN", fmt.Sprintf("%s is not joined to the room", value))
	}
	return nil
}

// httpURL is the LiveKit server's HTTP API address for its WebSocket URL.
func httpURL(wsURL string) string {
	switch {
	case strings.HasPrefix(wsURL, "ws://"):
		return "http://" + strings.TrimPrefix(wsURL, "ws://")
	case strings.HasPrefix(wsURL, "wss://"):
		return "https://" + strings.TrimPrefix(wsURL, "wss://")
	}
	return wsURL
}

// createRoom creates the LiveKit room before the token for it is handed out.
func (a *appservice) createRoom(ctx context.Context, alias string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := a.rooms.CreateRoom(ctx, &livekit.CreateRoomRequest{
		Name:             alias,
		EmptyTimeout:     300,
		DepartureTimeout: 20,
		MaxParticipants:  0,
	})
	return err
}

// issue creates the room and mints a token for identity in it.
func (s *service) issue(r *http.Request, route, roomID, slotID, identity string, canPublish bool) (string, *matrixError) {
	alias := lkjwt.HashOfStrings(roomID, slotID)
	s.stats.add(&s.stats.CreateRoom, route)
	if err := s.as.createRoom(r.Context(), alias); err != nil {
		s.stats.add(&s.stats.CreateRoomFailed, route)
		log.Printf("%s: CreateRoom %s failed: %v", r.URL.Path, alias, err)
		return "", refusal(http.StatusInternalServerError, "M_UNKNOWN", "Unable to create room on SFU")
	}
	jwt, err := s.mint(identity, alias, canPublish)
	if err != nil {
		return "", refusal(http.StatusInternalServerError, "M_UNKNOWN", "Internal Server Error")
	}
	s.stats.add(&s.stats.Issued, route)
	return jwt, nil
}

// mint is the LiveKit join token every route hands out: HS256, valid for an hour.
func (s *service) mint(identity, alias string, canPublish bool) (string, error) {
	canSubscribe, canUpdate := true, true
	grant := &auth.VideoGrant{
		RoomJoin:             true,
		Room:                 alias,
		CanPublish:           &canPublish,
		CanSubscribe:         &canSubscribe,
		CanUpdateOwnMetadata: &canUpdate,
	}
	return auth.NewAccessToken(s.key, s.secret).
		SetIdentity(identity).
		SetVideoGrant(grant).
		SetValidFor(time.Hour).
		ToJWT()
}

// appserviceRoute wraps a handler of a route Synapse forwards: POST only, the hs_token
// checked first, refusals answered as Matrix errors.
func (s *service) appserviceRoute(name string, handle func(*http.Request) (any, *matrixError)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			writeRefusal(w, refusal(http.StatusMethodNotAllowed, "M_UNRECOGNIZED", "Unrecognized request"))
			return
		}
		s.stats.add(&s.stats.Requests, name)
		if e := s.as.authorise(r); e != nil {
			writeRefusal(w, e)
			return
		}
		answer, e := handle(r)
		if e != nil {
			writeRefusal(w, e)
			return
		}
		writeJSON(w, http.StatusOK, answer)
	}
}

type jwtAnswer struct {
	JWT string `json:"jwt"`
}

// clientToken serves a client's token request forwarded by Synapse, which authenticated
// the client and names it in X-Matrix-User-Identifier.
func (s *service) clientToken(r *http.Request) (any, *matrixError) {
	user := r.Header.Get("X-Matrix-User-Identifier")
	if user == "" {
		return nil, refusal(http.StatusBadRequest, "M_MISSING_PARAM", "Missing X-Matrix-User-Identifier")
	}
	var req clientTokenRequest
	if e := readBody(r, &req); e != nil {
		return nil, e
	}
	if e := requireFields("room_id", req.RoomID, "slot_id", req.SlotID, "member_id", req.MemberID,
		"url", req.URL); e != nil {
		return nil, e
	}
	if e := s.as.checkURL(s, req.URL); e != nil {
		return nil, e
	}
	if req.ServerName != "" && req.ServerName != s.as.serverName {
		// lk-jwt-service would ask that server over federation and hand back its token.
		log.Printf("%s: %s asked a token from %s; relaying is not supported", r.URL.Path, user, req.ServerName)
		return nil, refusal(http.StatusBadGateway, "M_UNKNOWN",
			"relaying to other homeservers is not supported by the stand-in")
	}
	if e := s.as.checkJoined(r, s.client, req.RoomID, "mxid", user); e != nil {
		return nil, e
	}
	jwt, e := s.issue(r, "client", req.RoomID, req.SlotID, lkjwt.HashOfStrings(user, req.MemberID), true)
	if e != nil {
		return nil, e
	}
	return jwtAnswer{jwt}, nil
}

// federationToken serves another homeserver's token request for one of its users,
// forwarded by Synapse after checking its signature (X-Matrix-Origin). Tokens are
// subscribe-only.
func (s *service) federationToken(r *http.Request) (any, *matrixError) {
	origin := r.Header.Get("X-Matrix-Origin")
	if origin == "" {
		return nil, refusal(http.StatusUnauthorized, "M_UNAUTHORIZED", "Missing X-Matrix-Origin")
	}
	var req federationTokenRequest
	if e := readBody(r, &req); e != nil {
		return nil, e
	}
	if e := requireFields("user_id", req.UserID, "url", req.URL, "room_id", req.RoomID,
		"slot_id", req.SlotID, "member_id", req.MemberID); e != nil {
		return nil, e
	}
	if e := s.as.checkURL(s, req.URL); e != nil {
		return nil, e
	}
	if _, server, _ := strings.Cut(req.UserID, ":"); server != origin {
		return nil, refusal(http.StatusForbidden, "M_FORBIDDEN",
			fmt.Sprintf("%s is not a user of %s", req.UserID, origin))
	}
	if e := s.as.checkJoined(r, s.client, req.RoomID, "server_name", s.as.serverName); e != nil {
		return nil, e
	}
	if e := s.as.checkJoined(r, s.client, req.RoomID, "mxid", req.UserID); e != nil {
		return nil, e
	}
	jwt, e := s.issue(r, "federation", req.RoomID, req.SlotID, lkjwt.HashOfStrings(req.UserID, req.MemberID), false)
	if e != nil {
		return nil, e
	}
	return jwtAnswer{jwt}, nil
}

// emptyAnswer serves routes that only acknowledge (delegate_delayed_leave, ping).
func emptyAnswer(*http.Request) (any, *matrixError) {
	return struct{}{}, nil
}

// routeAppservice adds the routes Synapse forwards to the application service.
func (s *service) routeAppservice(mux *http.ServeMux) {
	for _, prefix := range clientPrefixes {
		mux.HandleFunc(prefix+"/get_token", s.appserviceRoute("client", s.clientToken))
		mux.HandleFunc(prefix+"/delegate_delayed_leave", s.appserviceRoute("delegate_delayed_leave", emptyAnswer))
	}
	for _, prefix := range federationPrefixes {
		mux.HandleFunc(prefix+"/get_token", s.appserviceRoute("federation", s.federationToken))
	}
	mux.HandleFunc("/_matrix/app/v1/ping", s.appserviceRoute("ping", emptyAnswer))
}

var errNoSynapse = errors.New("--hs-token needs --as-token, --server-name and --synapse")

func newAppservice(hsToken, asToken, serverName, synapse, livekitURL, key, secret string) (*appservice, error) {
	if asToken == "" || serverName == "" || synapse == "" {
		return nil, errNoSynapse
	}
	return &appservice{
		hsToken:    hsToken,
		asToken:    asToken,
		serverName: serverName,
		synapse:    strings.TrimRight(synapse, "/"),
		rooms:      lksdk.NewRoomServiceClient(httpURL(livekitURL), key, secret),
	}, nil
}
